package main

import (
	"context"
	"io"
	"testing"
	"time"
)

// TestTopicSmoke runs the topic benchmark with tiny counts: each topic
// message must be stored once and reach every online follower once; the
// write-diffusion baseline stores one entry per online user.
func TestTopicSmoke(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, 2*time.Minute,
		[]string{"topic", "-followers", "3000", "-online", "40", "-messages", "3", "-interval", "10ms", "-timeout", "2m"},
		[]string{
			`^topic\s+3\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+0\s+1\.00\s+0$`,
			`^write diffusion\s+3\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+0\s+40\.00\s+160$`,
			`^load:\s+3000 follows written in ` + num + ` s`,
		},
		[]string{
			"topic: stored copies per message 1.00 (write diffusion 40.00): goal 1: MET",
			"topic: oplog entries added 0: goal 0: MET",
			"topic: lost 0, duplicated 0, stray 0: goal 0: MET",
		})
}

func TestTopicFlags(t *testing.T) {
	for _, args := range [][]string{
		{"topic", "-followers", "10", "-online", "11"},
		{"topic", "-payload", "8"},
		{"topic", "-fsync", "never"},
		{"topic", "-transport", "udp"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}
