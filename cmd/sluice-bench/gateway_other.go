//go:build !linux

package main

import (
	"net"
	"os/exec"
	"runtime"
	"time"
)

// childAttrs: without process groups and a parent-death signal here, a
// child is stopped by killing it alone.
func childAttrs(cmd *exec.Cmd) {}

func killGroup(cmd *exec.Cmd) error {
	if cmd.Process == nil {
		return nil
	}
	return cmd.Process.Kill()
}

// raiseFileLimit is not attempted on this platform.
func raiseFileLimit() (soft, hard uint64, err error) { return 0, 0, nil }

// sourceIPs: only 127.0.0.1 answers by default outside Linux.
func sourceIPs(int) []net.IP { return []net.IP{net.IPv4(127, 0, 0, 1)} }

// residentBytes falls back to the memory the Go runtime holds from the OS.
func residentBytes() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Sys - m.HeapReleased
}

// processCPU is not measured on this platform.
func processCPU(int) (time.Duration, bool) { return 0, false }
