package fanout

import (
	"fmt"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// checkTemplate validates a job's event template as the oplog validates an
// event (same rules, same errors), minus the targets, which come from the
// audience, and resolves its defaults from the business so that every
// entry of the job is the same. created_at, if missing, is set now: every
// recipient's entry carries the same one.
//
// Beyond the oplog's rules (Log.CheckTemplate) a template names no
// targets, message id or topic, and is not transient.
func (f *Fanout) checkTemplate(ev *oplogpb.Event, now time.Time) error {
	if len(ev.Targets) > 0 {
		return fmt.Errorf("the template names targets: recipients come from the audience: %w", oplog.ErrInvalid)
	}
	if ev.MessageId != "" {
		return fmt.Errorf("the template names a message id: a job's entries carry %q: %w", MessageIDPrefix+"<job>", oplog.ErrInvalid)
	}
	if ev.Transient {
		return fmt.Errorf("transient events are never stored, so never fanned out: %w", oplog.ErrInvalid)
	}
	return f.lg.CheckTemplate(ev, now)
}
