package delivery

import (
	"context"
	"testing"

	"github.com/sluicehq/sluice/delivery/deliverypb"
)

// SetMaxCachedObject lowers the size above which downloads are streamed,
// for the test.
func SetMaxCachedObject(t testing.TB, n int64) {
	old := maxCachedObject
	maxCachedObject = n
	t.Cleanup(func() { maxCachedObject = old })
}

// UpdateSwitch is the read-modify-write of Kill and SwitchOffFor, for the
// test.
func (d *Delivery) UpdateSwitch(ctx context.Context, key, actor string, change func(*deliverypb.Switch) error) (*deliverypb.Switch, error) {
	return d.updateSwitch(ctx, key, actor, "changed", change)
}
