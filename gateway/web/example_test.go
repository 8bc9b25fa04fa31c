package web_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"

	"github.com/sluicehq/sluice/gateway/web"
)

// Serve the demo page and sluice.js beside the gateway's WebSocket
// endpoint: the client connects to /v1/ws on the page's host by default.
func ExampleHandler() {
	mux := http.NewServeMux()
	// mux.Handle("/v1/ws", gw.WebSocketHandler(nil)) // gw: a *gateway.Server
	mux.Handle("/", web.Handler())
	srv := httptest.NewServer(mux)
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/sluice.js")
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println(resp.Status, resp.Header.Get("Content-Type"), resp.Header.Get("Cache-Control"))
	// Output: 200 OK application/javascript; charset=utf-8 no-cache
}
