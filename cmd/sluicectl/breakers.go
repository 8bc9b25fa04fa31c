package main

// Circuit breaker and diagnostics commands over the admin API (routes in
// cmd/sluiced/admin_analytics.go and admin_diagnostics.go).

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/encoding/protojson"
)

// breakerCmd: list, set ID (--file or flags), rm ID.
func (c *cli) breakerCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("breaker: want list, set or rm: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("breaker "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	file := fs.String("file", "", "set: the rule as JSON (an analyticspb.BreakerRule in protojson; - for stdin)")
	app := fs.String("app", "", "set: the app")
	pkg := fs.String("package", "", "set: the release's package ...")
	version := fs.String("version", "", "set: ... and version")
	sw := fs.String("switch", "", "set: or a switch ...")
	variant := fs.String("variant", "", "set: ... and its variant (empty: the default)")
	model := fs.String("model", "", "set: only devices of this model")
	metric := fs.String("metric", "crash", "set: crash or freeze (rate)")
	threshold := fs.Float64("threshold", 0.05, "set: the rate over which it trips, e.g. 0.05 for 5%")
	minSessions := fs.Uint64("min-sessions", 100, "set: sessions needed in the window")
	window := fs.Duration("window", 30*time.Minute, "set: the window, 1m to 24h")
	action := fs.String("action", "pause", "set: pause, rollback (releases) or off (switches)")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	switch sub {
	case "list":
		if err := wantArgs(pos, 0, "breaker list"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/breakers", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Rules []json.RawMessage `json:"rules"`
				Trips []json.RawMessage `json:"trips"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			rules, err := decodeAll[*analyticspb.BreakerRule](out.Rules)
			if err != nil {
				return err
			}
			trips, err := decodeAll[*analyticspb.BreakerTrip](out.Trips)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "RULE\tTARGET\tMODEL\tMETRIC\tOVER\tMIN SESSIONS\tWINDOW\tACTION")
			for _, rl := range rules {
				target := rl.Package + " " + rl.Version
				if rl.SwitchKey != "" {
					target = "switch " + rl.SwitchKey + "=" + rl.SwitchVariant
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.2f%%\t%d\t%v\t%s\n", rl.Id, target, rl.Model, rl.Metric, 100*rl.Threshold,
					rl.MinSessions, time.Duration(rl.WindowMs)*time.Millisecond, rl.Action)
			}
			fmt.Fprintln(tw, "\nTRIPPED\tAT\tSLICE\tSESSIONS\tAFFECTED\tRATE\tRESULT")
			for _, tr := range trips {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%.2f%%\t%s\n", tr.Rule, time.UnixMilli(tr.AtMs).UTC().Format(time.RFC3339),
					tr.Slice, tr.Sessions, tr.Affected, 100*tr.Rate, tr.Result)
			}
			return tw.Flush()
		})
	case "set":
		if err := wantArgs(pos, 1, "breaker set ID (--file F | --app A (--package P --version V | --switch K) ...)"); err != nil {
			return err
		}
		var body []byte
		if *file != "" {
			if body, err = readInput(*file); err != nil {
				return err
			}
		} else {
			rl := &analyticspb.BreakerRule{Id: pos[0], App: *app, Package: *pkg, Version: *version, SwitchKey: *sw,
				SwitchVariant: *variant, Model: *model, Threshold: *threshold, MinSessions: *minSessions, WindowMs: window.Milliseconds()}
			switch *metric {
			case "crash":
				rl.Metric = analyticspb.Metric_METRIC_CRASH_RATE
			case "freeze":
				rl.Metric = analyticspb.Metric_METRIC_FREEZE_RATE
			default:
				return fmt.Errorf("breaker set: --metric %q: want crash or freeze: %w", *metric, errUsage)
			}
			switch *action {
			case "pause":
				rl.Action = analyticspb.Action_ACTION_PAUSE
			case "rollback":
				rl.Action = analyticspb.Action_ACTION_ROLLBACK
			case "off":
				rl.Action = analyticspb.Action_ACTION_SWITCH_OFF
			default:
				return fmt.Errorf("breaker set: --action %q: want pause, rollback or off: %w", *action, errUsage)
			}
			if body, err = protojson.Marshal(rl); err != nil {
				return err
			}
		}
		return c.show(ctx, http.MethodPut, "/v1/breakers/"+pos[0], nil, bytes.NewReader(body), *asJSON, func(json.RawMessage) error {
			fmt.Fprintf(c.out, "breaker %s set\n", pos[0])
			return nil
		})
	case "rm":
		if err := wantArgs(pos, 1, "breaker rm ID"); err != nil {
			return err
		}
		if _, err := c.request(ctx, http.MethodDelete, "/v1/breakers/"+pos[0], nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "breaker %s removed\n", pos[0])
		return nil
	}
	return fmt.Errorf("breaker %s: want list, set or rm: %w", sub, errUsage)
}

// diagCmd: request (--device D | --user U) [--note N], list, show ID,
// logs ID DEVICE [-o FILE].
func (c *cli) diagCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("diag: want request, list, show or logs: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("diag "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	device := fs.String("device", "", "request: the device whose logs to collect")
	user := fs.String("user", "", "request: or every device of this user")
	note := fs.String("note", "", "request: why (kept with the request)")
	out := fs.String("o", "", "logs: write them to this file (default stdout)")
	limit := fs.Int("limit", 20, "list: how many, newest first")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	switch sub {
	case "request":
		if err := wantArgs(pos, 0, "diag request (--device D | --user U) [--note N]"); err != nil {
			return err
		}
		body, _ := json.Marshal(map[string]string{"device": *device, "user": *user, "note": *note})
		return c.show(ctx, http.MethodPost, "/v1/diagnostics", nil, bytes.NewReader(body), *asJSON, func(raw json.RawMessage) error {
			r := &analyticspb.DiagnosticRequest{}
			if err := decodePB(raw, r); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "diagnostics %s requested (%s)\n", r.Id, r.Status)
			return nil
		})
	case "list", "show":
		path, q := "/v1/diagnostics", url.Values{"limit": {strconv.Itoa(*limit)}}
		if sub == "show" {
			if err := wantArgs(pos, 1, "diag show ID"); err != nil {
				return err
			}
			path, q = "/v1/diagnostics/"+pos[0], nil
		} else if err := wantArgs(pos, 0, "diag list"); err != nil {
			return err
		}
		raw, err := c.request(ctx, http.MethodGet, path, q, nil)
		if err != nil {
			return err
		}
		return c.printJSON(raw)
	case "logs":
		if err := wantArgs(pos, 2, "diag logs ID DEVICE [-o FILE]"); err != nil {
			return err
		}
		path := "/v1/diagnostics/" + pos[0] + "/logs/" + pos[1]
		if *out == "" {
			return c.download(ctx, path, c.out)
		}
		var buf bytes.Buffer
		if err := c.download(ctx, path, &buf); err != nil {
			return err
		}
		if err := os.WriteFile(*out, buf.Bytes(), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "wrote %d bytes to %s\n", buf.Len(), *out)
		return nil
	}
	return fmt.Errorf("diag %s: want request, list, show or logs: %w", sub, errUsage)
}

// download copies a binary admin answer to w.
func (c *cli) download(ctx context.Context, path string, w io.Writer) error {
	resp, err := c.callOK(ctx, http.MethodGet, path, nil, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	return err
}
