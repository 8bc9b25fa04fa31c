package client

import (
	"math/rand/v2"
	"time"
)

// backoff is the full-jitter delay before reconnect attempt n (0 for the
// first retry after a good session): uniform in [0, min(hi, lo*2^n)].
func backoff(n int, lo, hi time.Duration) time.Duration {
	ceil := hi
	if n < 62 {
		if d := lo << n; d > 0 && d < hi && d>>n == lo {
			ceil = d
		}
	}
	if ceil <= 0 {
		return 0
	}
	return rand.N(ceil + 1)
}
