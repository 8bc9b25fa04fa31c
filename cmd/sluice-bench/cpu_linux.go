//go:build linux

package main

import (
	"bytes"
	"os"
	"strconv"
	"time"
)

// userHZ is the unit of /proc/stat (USER_HZ, 100 on every Linux ABI Go
// supports).
const userHZ = 100

// machineBusy is the CPU time every process on the machine has used
// (user, nice, system, irq, softirq, steal), from /proc/stat; ok is false
// when it cannot be read.
func machineBusy() (d time.Duration, ok bool) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	line, _, _ := bytes.Cut(data, []byte("\n"))
	f := bytes.Fields(line)
	if len(f) < 9 || string(f[0]) != "cpu" {
		return 0, false
	}
	var ticks uint64
	for _, i := range []int{1, 2, 3, 6, 7, 8} { // skip idle (4) and iowait (5)
		v, err := strconv.ParseUint(string(f[i]), 10, 64)
		if err != nil {
			return 0, false
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / userHZ, true
}
