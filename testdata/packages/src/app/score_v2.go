//go:build v2

package main

import (
	"math"
	"time"
)

// score ranks an item by its click and order rates, smoothed for items
// with few views and decayed by the age of its last update.
func score(it Item, now time.Time) float64 {
	const prior = 20.0
	ctr := (float64(it.Clicks) + 1) / (float64(it.Views) + prior)
	cvr := (float64(it.Orders) + 0.5) / (float64(it.Views) + prior)
	age := now.Sub(it.Updated).Hours() / 24
	if age < 0 {
		age = 0
	}
	return (0.3*ctr + 0.7*cvr) * math.Exp(-age/30)
}
