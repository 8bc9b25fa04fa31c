//go:build linux

package web_test

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// prSetChildSubreaper is PR_SET_CHILD_SUBREAPER from linux/prctl.h.
const prSetChildSubreaper = 36

var subreaper sync.Once

// isolate runs cmd in a process group of its own, which a cancelled
// context kills whole. Chromium's renderers and zygotes stay in the group,
// but its crash handler double-forks into a session of its own, and
// children of a killed zygote are orphaned: this test process becomes
// their reaper, so terminate can kill and reap them rather than leave
// zombies to a PID 1 that may not reap.
func isolate(cmd *exec.Cmd) {
	subreaper.Do(func() {
		_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0)
	})
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
}

// terminate stops the browser and every process it started: SIGTERM first
// (Chromium then closes its pages and helpers), SIGKILL to the group if it
// lingers, then kill and reap the helpers orphaned to this process. It
// returns the processes still there after 5 seconds.
func terminate(b *browser) (left []string) {
	pid := b.cmd.Process.Pid
	_ = syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(3 * time.Second):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-b.exited
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		procs := leftovers(pid)
		if len(procs) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			for _, p := range procs {
				left = append(left, p.String())
			}
			return left
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		for _, p := range procs {
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
			if p.ppid == os.Getpid() {
				var ws syscall.WaitStatus
				_, _ = syscall.Wait4(p.pid, &ws, syscall.WNOHANG, nil)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type proc struct {
	pid, ppid, pgrp int
	state, comm     string
}

func (p proc) String() string {
	return fmt.Sprintf("%d %s (%s, parent %d)", p.pid, p.comm, p.state, p.ppid)
}

// leftovers lists the processes of group pgrp, zombies included, and this
// process's children that are Chromium's (its crash handler has a group of
// its own).
func leftovers(pgrp int) []proc {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces and parens.
		s := string(data)
		open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || end < open {
			continue
		}
		f := strings.Fields(s[end+1:])
		if len(f) < 3 {
			continue
		}
		p := proc{pid: pid, comm: s[open+1 : end], state: f[0]}
		p.ppid, _ = strconv.Atoi(f[1])
		p.pgrp, _ = strconv.Atoi(f[2])
		if p.pgrp == pgrp || (p.ppid == self && strings.HasPrefix(p.comm, "chrom")) {
			out = append(out, p)
		}
	}
	return out
}
