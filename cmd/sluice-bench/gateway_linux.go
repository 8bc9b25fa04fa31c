//go:build linux

package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// childAttrs puts a server child in its own process group, so stopping it
// stops everything it started, and has the kernel kill it should this
// process die first (as cmd/sluiced/durability_test.go does).
func childAttrs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return killGroup(cmd) }
}

// killGroup sends SIGKILL to the child's process group.
func killGroup(cmd *exec.Cmd) error {
	if cmd.Process == nil {
		return nil
	}
	err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	if err == syscall.ESRCH {
		return os.ErrProcessDone
	}
	return err
}

// raiseFileLimit raises the soft limit on open files to the hard limit and
// returns both.
func raiseFileLimit() (soft, hard uint64, err error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, 0, fmt.Errorf("getrlimit: %w", err)
	}
	if r.Cur < r.Max {
		r.Cur = r.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
			return 0, 0, fmt.Errorf("setrlimit: %w", err)
		}
	}
	return r.Cur, r.Max, nil
}

// sourceIPs are the loopback addresses clients dial from: Linux answers
// the whole of 127.0.0.0/8 on lo, so spreading connections over several
// source addresses keeps each one's share of the ephemeral ports small.
func sourceIPs(n int) []net.IP {
	ips := make([]net.IP, 0, n)
	for i := range n {
		ips = append(ips, net.IPv4(127, 0, 0, byte(2+i)))
	}
	return ips
}

// residentBytes is this process's resident set (VmRSS).
func residentBytes() uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			f := bytes.Fields(v)
			if len(f) == 0 {
				return 0
			}
			kb, _ := strconv.ParseUint(string(f[0]), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// processCPU is the CPU time (user + system) process pid has used, from
// /proc/<pid>/stat; ok is false when it cannot be read.
func processCPU(pid int) (time.Duration, bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// The command name (field 2) may hold spaces: fields count from the
	// last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(data[i+1:])
	if len(f) < 13 {
		return 0, false
	}
	ut, err1 := strconv.ParseUint(string(f[11]), 10, 64)
	st, err2 := strconv.ParseUint(string(f[12]), 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(ut+st) * time.Second / userHZ, true
}
