//go:build !linux

package web_test

import "os/exec"

// isolate does nothing here: process groups and reaping are handled on
// Linux only, where CI runs the browser test.
func isolate(cmd *exec.Cmd) {}

// terminate kills the browser and waits for it.
func terminate(b *browser) []string {
	_ = b.cmd.Process.Kill()
	<-b.exited
	return nil
}
