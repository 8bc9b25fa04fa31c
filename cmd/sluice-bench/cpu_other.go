//go:build !unix

package main

import "time"

// cpuTime is not measured on this platform.
func cpuTime() time.Duration { return 0 }

// machineBusy is not measured on this platform.
func machineBusy() (time.Duration, bool) { return 0, false }
