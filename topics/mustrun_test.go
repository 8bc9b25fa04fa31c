package topics_test

import (
	"testing"

	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicstest"
)

func mustRun(t testing.TB, cfg topics.Config) *topics.Topics { return topicstest.MustRun(t, cfg) }
