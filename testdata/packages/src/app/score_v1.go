//go:build !v2

package main

import "time"

// score ranks an item by its click and order rates.
func score(it Item, now time.Time) float64 {
	if it.Views == 0 {
		return 0
	}
	ctr := float64(it.Clicks) / float64(it.Views)
	cvr := float64(it.Orders) / float64(it.Views)
	return 0.3*ctr + 0.7*cvr
}
