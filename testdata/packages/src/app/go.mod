module example.com/sluice-demo-app

go 1.26
