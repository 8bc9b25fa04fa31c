//go:build unix && !linux

package main

import "time"

// machineBusy is not measured on this platform.
func machineBusy() (time.Duration, bool) { return 0, false }
