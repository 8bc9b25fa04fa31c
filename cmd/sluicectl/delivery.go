package main

// Delivery commands over the admin API (routes in
// cmd/sluiced/admin_delivery.go): switches, packages and their releases,
// producer keys, pushes, the device registry and the manifest key.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// pbjson decodes answers; it skips fields this sluicectl does not know, so
// that it works with a newer sluiced.
var pbjson = protojson.UnmarshalOptions{DiscardUnknown: true}

// parseInterleaved parses fs over args, letting flags come before, between
// or after the positional arguments, which it returns.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// wantArgs checks the count of positional arguments.
func wantArgs(pos []string, n int, usage string) error {
	if len(pos) != n {
		return fmt.Errorf("%s: %w", usage, errUsage)
	}
	return nil
}

// request sends one admin request and returns its JSON answer.
func (c *cli) request(ctx context.Context, method, path string, q url.Values, body io.Reader) (json.RawMessage, error) {
	var raw json.RawMessage
	if err := c.do(ctx, method, path, q, body, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// printJSON prints an answer, indented.
func (c *cli) printJSON(raw json.RawMessage) error {
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		return err
	}
	buf.WriteByte('\n')
	_, err := c.out.Write(buf.Bytes())
	return err
}

// show sends one admin request and prints its answer: as JSON with
// asJSON, else through render.
func (c *cli) show(ctx context.Context, method, path string, q url.Values, body io.Reader, asJSON bool, render func(raw json.RawMessage) error) error {
	raw, err := c.request(ctx, method, path, q, body)
	if err != nil {
		return err
	}
	if asJSON {
		return c.printJSON(raw)
	}
	return render(raw)
}

// decodePB decodes a protojson answer.
func decodePB(raw json.RawMessage, m proto.Message) error {
	if err := pbjson.Unmarshal(raw, m); err != nil {
		return fmt.Errorf("decode answer: %w", err)
	}
	return nil
}

// decodeAll decodes a list of protojson answers into messages of type T
// (a pointer to a generated message).
func decodeAll[T proto.Message](raws []json.RawMessage) ([]T, error) {
	var zero T
	out := make([]T, 0, len(raws))
	for _, raw := range raws {
		m := zero.ProtoReflect().New().Interface().(T)
		if err := decodePB(raw, m); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// readInput reads a file, or standard input for "-".
func readInput(path string) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(path)
}

// enumName shortens an enum value's name: SWITCH_TYPE_BOOL → bool.
func enumName(s, prefix string) string {
	return strings.ToLower(strings.TrimPrefix(s, prefix))
}

// msTime formats unix milliseconds ("-" for zero).
func msTime(ms int64) string {
	if ms == 0 {
		return "-"
	}
	return time.UnixMilli(ms).Local().Format(time.DateTime)
}

// valueString formats a switch value.
func valueString(v *deliverypb.Value) string {
	switch k := v.GetKind().(type) {
	case *deliverypb.Value_BoolValue:
		return strconv.FormatBool(k.BoolValue)
	case *deliverypb.Value_IntValue:
		return strconv.FormatInt(k.IntValue, 10)
	case *deliverypb.Value_NumberValue:
		return strconv.FormatFloat(k.NumberValue, 'g', -1, 64)
	case *deliverypb.Value_StringValue:
		return strconv.Quote(k.StringValue)
	case *deliverypb.Value_JsonValue:
		return k.JsonValue
	}
	return "-"
}

// ruleString summarizes a rule: its predicates, whitelist, share and
// window; "everyone" for none.
func ruleString(r *deliverypb.Rule) string {
	if r == nil {
		return "everyone"
	}
	var parts []string
	list := func(name string, v []string) {
		if len(v) > 0 {
			s := strings.Join(v, ",")
			if len(v) > 5 {
				s = strings.Join(v[:5], ",") + fmt.Sprintf(",…(%d)", len(v))
			}
			parts = append(parts, name+"="+s)
		}
	}
	rng := func(name, lo, hi string) {
		if lo != "" || hi != "" {
			parts = append(parts, name+"="+lo+".."+hi)
		}
	}
	if r.Percent != nil {
		parts = append(parts, "percent="+strconv.FormatFloat(r.GetPercent(), 'g', -1, 64))
	}
	list("users", r.Users)
	list("devices", r.Devices)
	rng("app_version", r.AppVersionMin, r.AppVersionMax)
	list("os", r.Os)
	rng("os_version", r.OsVersionMin, r.OsVersionMax)
	list("models", r.Models)
	list("networks", r.Networks)
	list("regions", r.Regions)
	list("cpus", r.Cpus)
	list("channels", r.Channels)
	if r.NotBeforeMs != 0 || r.NotAfterMs != 0 {
		parts = append(parts, "window="+msTime(r.NotBeforeMs)+".."+msTime(r.NotAfterMs))
	}
	if len(parts) == 0 {
		return "everyone"
	}
	return strings.Join(parts, " ")
}

// splitList splits a comma-separated flag value.
func splitList(s string) []string {
	var out []string
	for v := range strings.SplitSeq(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// ruleFlags builds a targeting rule from flags, or takes it whole as JSON.
type ruleFlags struct {
	json, file                   string
	percent                      *float64
	users, devices, os           string
	models, regions, networks    string
	channels, cpus               string
	appMin, appMax, osMin, osMax string
}

func (rf *ruleFlags) register(fs *flag.FlagSet, name string) {
	fs.StringVar(&rf.json, name+"-json", "", "the rule as JSON (a deliverypb.Rule in protojson), instead of the rule flags")
	fs.StringVar(&rf.file, name+"-file", "", "file holding the rule as JSON, instead of the rule flags")
	fs.Func("percent", "share of the matching devices, 0-100 (sticky per device)", func(s string) error {
		p, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return err
		}
		rf.percent = &p
		return nil
	})
	fs.StringVar(&rf.users, "users", "", "whitelist: these users' devices, comma-separated (give --percent 0 for the whitelist only)")
	fs.StringVar(&rf.devices, "devices", "", "whitelist: these devices, comma-separated")
	fs.StringVar(&rf.os, "os", "", "operating systems, comma-separated (ios,android,…)")
	fs.StringVar(&rf.appMin, "app-version-min", "", "lowest app version (inclusive)")
	fs.StringVar(&rf.appMax, "app-version-max", "", "highest app version (inclusive)")
	fs.StringVar(&rf.osMin, "os-version-min", "", "lowest OS version (inclusive)")
	fs.StringVar(&rf.osMax, "os-version-max", "", "highest OS version (inclusive)")
	fs.StringVar(&rf.models, "models", "", "device models, comma-separated")
	fs.StringVar(&rf.regions, "regions", "", "regions, comma-separated")
	fs.StringVar(&rf.networks, "networks", "", "networks, comma-separated")
	fs.StringVar(&rf.channels, "channels", "", "distribution channels, comma-separated")
	fs.StringVar(&rf.cpus, "cpus", "", "CPU architectures, comma-separated")
}

// rule returns the rule the flags describe, or nil if they describe none.
func (rf *ruleFlags) rule(name string) (*deliverypb.Rule, error) {
	r := &deliverypb.Rule{Percent: rf.percent, Users: splitList(rf.users), Devices: splitList(rf.devices), Os: splitList(rf.os),
		AppVersionMin: rf.appMin, AppVersionMax: rf.appMax, OsVersionMin: rf.osMin, OsVersionMax: rf.osMax,
		Models: splitList(rf.models), Regions: splitList(rf.regions), Networks: splitList(rf.networks),
		Channels: splitList(rf.channels), Cpus: splitList(rf.cpus)}
	flags := !proto.Equal(r, &deliverypb.Rule{})
	src := rf.json
	if rf.file != "" {
		if src != "" {
			return nil, fmt.Errorf("--%s-json and --%s-file exclude each other", name, name)
		}
		b, err := readInput(rf.file)
		if err != nil {
			return nil, err
		}
		src = string(b)
	}
	if src == "" {
		if !flags {
			return nil, nil
		}
		return r, nil
	}
	if flags {
		return nil, fmt.Errorf("give the rule as JSON (--%s-json, --%s-file) or with flags, not both", name, name)
	}
	r = new(deliverypb.Rule)
	if err := protojson.Unmarshal([]byte(src), r); err != nil {
		return nil, fmt.Errorf("%s rule: %w", name, err)
	}
	return r, nil
}

func marshalPB(m proto.Message) *bytes.Reader {
	b, _ := protojson.Marshal(m)
	return bytes.NewReader(b)
}

// ----- switches -----

// switchCmd runs the switch commands.
//
//	switch list [--json]
//	switch get KEY [--json]
//	switch set KEY --file SWITCH.json [--expect VERSION]
//	switch kill|unkill|rm KEY
func (c *cli) switchCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("switch: want list, get, set, kill, unkill or rm: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("switch "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	file := fs.String("file", "", "set: the switch as JSON (a deliverypb.Switch in protojson; - for stdin)")
	expect := fs.Uint64("expect", 0, "set: only if the switch's version is still this (0: whatever it is)")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	method, path := http.MethodGet, ""
	var q url.Values
	var body io.Reader
	switch sub {
	case "list":
		if err := wantArgs(pos, 0, "switch list"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/switches", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Switches []json.RawMessage `json:"switches"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			sws, err := decodeAll[*deliverypb.Switch](out.Switches)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "KEY\tTYPE\tDEFAULT\tSTATE\tVARIANTS\tVERSION\tUPDATED BY")
			for _, sw := range sws {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\n", sw.Key, enumName(sw.Type.String(), "SWITCH_TYPE_"), valueString(sw.DefaultValue),
					switchState(sw), len(sw.Variants), sw.Version, cmp(sw.UpdatedBy, "-"))
			}
			return tw.Flush()
		})
	case "get", "kill", "unkill":
		if err := wantArgs(pos, 1, "switch "+sub+" KEY"); err != nil {
			return err
		}
		path = "/v1/switches/" + url.PathEscape(pos[0])
		if sub != "get" {
			path, method = path+"/"+sub, http.MethodPost
		}
	case "set":
		if err := wantArgs(pos, 1, "switch set KEY --file SWITCH.json [--expect VERSION]"); err != nil {
			return err
		}
		if *file == "" {
			return fmt.Errorf("switch set: --file is required: %w", errUsage)
		}
		b, err := readInput(*file)
		if err != nil {
			return err
		}
		if *expect > 0 {
			q = url.Values{"expect": {strconv.FormatUint(*expect, 10)}}
		}
		method, path, body = http.MethodPut, "/v1/switches/"+url.PathEscape(pos[0]), bytes.NewReader(b)
	case "rm", "remove":
		if err := wantArgs(pos, 1, "switch rm KEY"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodDelete, "/v1/switches/"+url.PathEscape(pos[0]), nil, nil, *asJSON, func(json.RawMessage) error {
			fmt.Fprintf(c.out, "switch %s removed\n", pos[0])
			return nil
		})
	default:
		return fmt.Errorf("switch %q: want list, get, set, kill, unkill or rm: %w", sub, errUsage)
	}
	return c.show(ctx, method, path, q, body, *asJSON, func(raw json.RawMessage) error {
		sw := new(deliverypb.Switch)
		if err := decodePB(raw, sw); err != nil {
			return err
		}
		c.printSwitch(sw, sub == "get")
		return nil
	})
}

func switchState(sw *deliverypb.Switch) string {
	if sw.Killed {
		return "killed→" + valueString(sw.KillValue)
	}
	return "live"
}

// printSwitch prints a switch: one line, and with detail its variants.
func (c *cli) printSwitch(sw *deliverypb.Switch, detail bool) {
	fmt.Fprintf(c.out, "switch %s type=%s default=%s state=%s version=%d updated_by=%s updated=%s\n", sw.Key,
		enumName(sw.Type.String(), "SWITCH_TYPE_"), valueString(sw.DefaultValue), switchState(sw), sw.Version,
		cmp(sw.UpdatedBy, "-"), msTime(sw.UpdatedMs))
	if !detail {
		return
	}
	if sw.Description != "" {
		fmt.Fprintf(c.out, "  description: %s\n", sw.Description)
	}
	if sw.KillValue != nil && !sw.Killed {
		fmt.Fprintf(c.out, "  kill value: %s\n", valueString(sw.KillValue))
	}
	for _, v := range sw.Variants {
		fmt.Fprintf(c.out, "  variant %s = %s when %s\n", v.Name, valueString(v.Value), ruleString(v.Rule))
	}
}

// ----- packages -----

// packageCmd runs the package commands.
//
//	package list [--json]
//	package show PKG [--json]
//	package upload PKG --kind KIND --version V --file PATH [--audience-json J|--audience-file F]
//	        [--fallback-url U] [--notes N] [--producer-key ID (--sign-with KEYFILE | --signature HEX)]
//	package gray PKG VERSION (--rule-json J | --rule-file F | --percent P [--users a,b] [--devices x,y] [--os ios] …)
//	package full|pause|resume|stop PKG VERSION
//	package rollback PKG
//	package dry-run PKG VERSION [rule flags]
func (c *cli) packageCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("package: want list, show, upload, gray, full, pause, resume, stop, rollback or dry-run: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("package "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	var rf ruleFlags
	switch sub {
	case "upload":
		return c.packageUpload(ctx, fs, asJSON, args[1:])
	case "gray", "dry-run":
		rf.register(fs, "rule")
	}
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	switch sub {
	case "list":
		if err := wantArgs(pos, 0, "package list"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/packages", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Packages map[string][]json.RawMessage `json:"packages"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			names := make([]string, 0, len(out.Packages))
			for name := range out.Packages {
				names = append(names, name)
			}
			sort.Strings(names)
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PACKAGE\tKIND\tVERSION\tSTAGE\tSIZE\tGRAY\tUPDATED")
			for _, name := range names {
				rels, err := decodeAll[*deliverypb.Release](out.Packages[name])
				if err != nil {
					return err
				}
				for _, rel := range rels {
					gray := "-"
					if rel.Stage == deliverypb.Stage_STAGE_GRAY {
						gray = ruleString(rel.Gray)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", rel.Package, enumName(rel.Kind.String(), "PACKAGE_KIND_"),
						rel.GetVersion().GetVersion(), stageString(rel), rel.GetVersion().GetSize(), gray, msTime(rel.UpdatedMs))
				}
			}
			return tw.Flush()
		})
	case "show":
		if err := wantArgs(pos, 1, "package show PKG"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/packages/"+url.PathEscape(pos[0]), nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Releases []json.RawMessage `json:"releases"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			rels, err := decodeAll[*deliverypb.Release](out.Releases)
			if err != nil {
				return err
			}
			for _, rel := range rels {
				c.printRelease(rel, true)
			}
			return nil
		})
	case "gray", "full", "pause", "resume", "stop":
		if err := wantArgs(pos, 2, "package "+sub+" PKG VERSION"); err != nil {
			return err
		}
		var body io.Reader
		if sub == "gray" {
			rule, err := rf.rule("rule")
			if err != nil {
				return err
			}
			if rule == nil {
				return fmt.Errorf("package gray: give the rule: --rule-json, --rule-file, or --percent and the other rule flags: %w", errUsage)
			}
			body = marshalPB(rule)
		}
		path := "/v1/packages/" + url.PathEscape(pos[0]) + "/" + url.PathEscape(pos[1]) + "/" + sub
		return c.show(ctx, http.MethodPost, path, nil, body, *asJSON, func(raw json.RawMessage) error {
			rel := new(deliverypb.Release)
			if err := decodePB(raw, rel); err != nil {
				return err
			}
			c.printRelease(rel, false)
			return nil
		})
	case "rollback":
		if err := wantArgs(pos, 1, "package rollback PKG"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodPost, "/v1/packages/"+url.PathEscape(pos[0])+"/rollback", nil, nil, *asJSON, func(raw json.RawMessage) error {
			rel := new(deliverypb.Release)
			if err := decodePB(raw, rel); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "rolled back %s to %s\n", pos[0], rel.GetVersion().GetVersion())
			c.printRelease(rel, false)
			return nil
		})
	case "dry-run":
		if err := wantArgs(pos, 2, "package dry-run PKG VERSION [rule flags]"); err != nil {
			return err
		}
		rule, err := rf.rule("rule")
		if err != nil {
			return err
		}
		var body io.Reader
		if rule != nil {
			body = marshalPB(rule)
		}
		path := "/v1/packages/" + url.PathEscape(pos[0]) + "/" + url.PathEscape(pos[1]) + "/dry-run"
		return c.dryRun(ctx, path, nil, body, *asJSON)
	}
	return fmt.Errorf("package %q: want list, show, upload, gray, full, pause, resume, stop, rollback or dry-run: %w", sub, errUsage)
}

func stageString(r *deliverypb.Release) string {
	s := enumName(r.Stage.String(), "STAGE_")
	if r.Paused {
		s += ",paused"
	}
	return s
}

// printRelease prints a release: one line, and with detail its version's
// digest, diffs, audience, signature and notes.
func (c *cli) printRelease(r *deliverypb.Release, detail bool) {
	v := r.GetVersion()
	line := fmt.Sprintf("%s %s kind=%s stage=%s size=%d", r.Package, v.GetVersion(), enumName(r.Kind.String(), "PACKAGE_KIND_"), stageString(r), v.GetSize())
	if r.Stage == deliverypb.Stage_STAGE_GRAY {
		line += " gray=[" + ruleString(r.Gray) + "]"
	}
	fmt.Fprintln(c.out, line)
	if !detail {
		return
	}
	fmt.Fprintf(c.out, "  sha256 %x serial=%d updated=%s\n", v.GetSha256(), r.Serial, msTime(r.UpdatedMs))
	for _, d := range v.GetDiffs() {
		fmt.Fprintf(c.out, "  diff from %s: %d bytes (%s)\n", d.FromVersion, d.Size, d.Format)
	}
	if v.GetAudience() != nil {
		fmt.Fprintf(c.out, "  audience: %s\n", ruleString(v.Audience))
	}
	if v.GetProducerKey() != "" {
		fmt.Fprintf(c.out, "  signed by producer key %s\n", v.ProducerKey)
	}
	if v.GetFallbackUrl() != "" {
		fmt.Fprintf(c.out, "  fallback: %s\n", v.FallbackUrl)
	}
	if v.GetNotes() != "" {
		fmt.Fprintf(c.out, "  notes: %s\n", v.Notes)
	}
}

func (c *cli) packageUpload(ctx context.Context, fs *flag.FlagSet, asJSON *bool, args []string) error {
	kind := fs.String("kind", "", "app, hot_patch, h5, mini_program, resource or config (required; fixed for the package's life)")
	version := fs.String("version", "", "the version, dotted (required; above the package's last)")
	file := fs.String("file", "", "the package bytes (required)")
	fallback := fs.String("fallback-url", "", "where clients may fetch the package if the download from Sluice fails")
	notes := fs.String("notes", "", "release notes")
	producerKey := fs.String("producer-key", "", "hot patches: the registered producer key id that signs")
	signWith := fs.String("sign-with", "", "hot patches: sign with this ed25519 private key (PEM PKCS #8, as producer-key gen writes)")
	signature := fs.String("signature", "", "hot patches: the producer's signature in hex, made elsewhere (instead of --sign-with)")
	var aud ruleFlags
	fs.StringVar(&aud.json, "audience-json", "", "the devices the package is for, as a JSON rule (default: every device)")
	fs.StringVar(&aud.file, "audience", "", "file holding the audience rule as JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, 1, "package upload PKG --kind KIND --version V --file PATH"); err != nil {
		return err
	}
	if *kind == "" || *version == "" || *file == "" {
		return fmt.Errorf("package upload: --kind, --version and --file are required: %w", errUsage)
	}
	if (*signWith != "" || *signature != "") && *producerKey == "" {
		return errors.New("package upload: a signature needs --producer-key")
	}
	if *signWith != "" && *signature != "" {
		return errors.New("package upload: --sign-with and --signature exclude each other")
	}
	q := url.Values{"version": {*version}, "kind": {*kind}}
	for k, v := range map[string]string{"fallback_url": *fallback, "notes": *notes, "producer_key": *producerKey, "producer_signature": *signature} {
		if v != "" {
			q.Set(k, v)
		}
	}
	rule, err := aud.rule("audience")
	if err != nil {
		return err
	}
	if rule != nil {
		b, _ := protojson.Marshal(rule)
		q.Set("audience", string(b))
	}
	f, err := os.Open(*file)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if *signWith != "" {
		key, err := loadPrivateKey(*signWith)
		if err != nil {
			return err
		}
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		q.Set("producer_signature", hex.EncodeToString(delivery.SignPackage(key, pos[0], *version, h.Sum(nil))))
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	// A section reader has a size: call sends it as the Content-Length.
	return c.show(ctx, http.MethodPost, "/v1/packages/"+url.PathEscape(pos[0])+"/versions", q, io.NewSectionReader(f, 0, fi.Size()), *asJSON,
		func(raw json.RawMessage) error {
			rel := new(deliverypb.Release)
			if err := decodePB(raw, rel); err != nil {
				return err
			}
			v := rel.GetVersion()
			fmt.Fprintf(c.out, "uploaded %s %s kind=%s stage=%s size=%d sha256=%x diffs=%d\n", rel.Package, v.GetVersion(),
				enumName(rel.Kind.String(), "PACKAGE_KIND_"), stageString(rel), v.GetSize(), v.GetSha256(), len(v.GetDiffs()))
			return nil
		})
}

// loadPrivateKey reads an ed25519 private key: a PEM "PRIVATE KEY" block
// (PKCS #8), the format of sluiced's token.key and of producer-key gen.
func loadPrivateKey(path string) (ed25519.PrivateKey, error) {
	// LoadOrCreateKey would create a missing key: check that it exists.
	if _, err := os.Stat(path); err != nil {
		return nil, err
	}
	return gateway.LoadOrCreateKey(path)
}

// dryRun asks how many known devices a rule, a release or a push reaches.
func (c *cli) dryRun(ctx context.Context, path string, q url.Values, body io.Reader, asJSON bool) error {
	return c.show(ctx, http.MethodPost, path, q, body, asJSON, func(raw json.RawMessage) error {
		dr := new(deliverypb.DryRun)
		if err := decodePB(raw, dr); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "matching=%d known=%d sample=%s\n", dr.Matching, dr.Known, cmp(strings.Join(dr.Sample, ","), "-"))
		return nil
	})
}

// ----- producer keys -----

// producerKeyCmd runs the producer key commands.
//
//	producer-key list [--json]
//	producer-key add ID (--public-key HEX | --key-file F)
//	producer-key revoke ID
//	producer-key gen OUTFILE
func (c *cli) producerKeyCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("producer-key: want list, add, revoke or gen: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("producer-key "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	pubHex := fs.String("public-key", "", "add: the ed25519 public key, hex (or base64)")
	keyFile := fs.String("key-file", "", "add: a PEM file holding the key: a PUBLIC KEY, or a PRIVATE KEY whose public half is taken")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	switch sub {
	case "list":
		return c.show(ctx, http.MethodGet, "/v1/producer-keys", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Keys []json.RawMessage `json:"keys"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			keys, err := decodeAll[*deliverypb.ProducerKey](out.Keys)
			if err != nil {
				return err
			}
			sort.Slice(keys, func(i, j int) bool { return keys[i].Id < keys[j].Id })
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tPUBLIC KEY\tSTATE\tSINCE")
			for _, k := range keys {
				state := "active"
				if k.Revoked {
					state = "revoked"
				}
				fmt.Fprintf(tw, "%s\t%x\t%s\t%s\n", k.Id, k.PublicKey, state, msTime(k.AtMs))
			}
			return tw.Flush()
		})
	case "add":
		if err := wantArgs(pos, 1, "producer-key add ID (--public-key HEX | --key-file F)"); err != nil {
			return err
		}
		pub := *pubHex
		switch {
		case pub != "" && *keyFile != "":
			return errors.New("producer-key add: --public-key and --key-file exclude each other")
		case *keyFile != "":
			k, err := gateway.LoadPublicKey(*keyFile)
			if err != nil {
				return err
			}
			pub = hex.EncodeToString(k)
		case pub == "":
			return fmt.Errorf("producer-key add: give --public-key or --key-file: %w", errUsage)
		}
		body, _ := json.Marshal(map[string]string{"public_key": pub})
		return c.show(ctx, http.MethodPut, "/v1/producer-keys/"+url.PathEscape(pos[0]), nil, bytes.NewReader(body), *asJSON, func(json.RawMessage) error {
			fmt.Fprintf(c.out, "producer key %s registered\n", pos[0])
			return nil
		})
	case "revoke":
		if err := wantArgs(pos, 1, "producer-key revoke ID"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodDelete, "/v1/producer-keys/"+url.PathEscape(pos[0]), nil, nil, *asJSON, func(json.RawMessage) error {
			fmt.Fprintf(c.out, "producer key %s revoked\n", pos[0])
			return nil
		})
	case "gen":
		if err := wantArgs(pos, 1, "producer-key gen OUTFILE"); err != nil {
			return err
		}
		pub, err := genKey(pos[0])
		if err != nil {
			return fmt.Errorf("producer-key gen: %w", err)
		}
		fmt.Fprintln(c.out, hex.EncodeToString(pub))
		fmt.Fprintf(c.errOut, "wrote the private key to %s (mode 0600); register its public key (above): sluicectl producer-key add ID --key-file %s\n", pos[0], pos[0])
	default:
		return fmt.Errorf("producer-key %q: want list, add, revoke or gen: %w", sub, errUsage)
	}
	return nil
}

// genKey writes a new ed25519 private key to path (PEM PKCS #8, mode
// 0600), which must not exist, and returns its public key.
func genKey(path string) (ed25519.PublicKey, error) {
	if _, err := os.Stat(path); err == nil {
		return nil, fmt.Errorf("%s exists: not overwriting a key", path)
	}
	key, err := gateway.LoadOrCreateKey(path)
	if err != nil {
		return nil, err
	}
	return key.Public().(ed25519.PublicKey), nil
}

// ----- pushes -----

// pushCmd runs the push commands.
//
//	push send --file PUSH.json
//	push send [--id ID] (--users a,b | --devices x | --segment S | --everyone) --title T [--body B]
//	          [--var k=v ...] [--action URI] [--collapse K] [--priority high] [--ttl 1h] [--data D --data-type CT]
//	push dry-run (the same flags)
//	push recall ID
//	push recalled
//	push funnel ID                 targeted, sent, delivered, opened, expired, offline
func (c *cli) pushCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("push: want send, dry-run, recall, recalled or funnel: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("push "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	switch sub {
	case "send", "dry-run":
		return c.pushSend(ctx, fs, asJSON, sub, args[1:])
	case "recall":
		pos, err := parseInterleaved(fs, args[1:])
		if err != nil {
			return err
		}
		if err := wantArgs(pos, 1, "push recall ID"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodPost, "/v1/pushes/"+url.PathEscape(pos[0])+"/recall", nil, nil, *asJSON, func(json.RawMessage) error {
			fmt.Fprintf(c.out, "push %s recalled: what is not delivered yet is withdrawn\n", pos[0])
			return nil
		})
	case "funnel":
		pos, err := parseInterleaved(fs, args[1:])
		if err != nil {
			return err
		}
		if err := wantArgs(pos, 1, "push funnel ID"); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/pushes/"+url.PathEscape(pos[0])+"/funnel", nil, nil, *asJSON, func(raw json.RawMessage) error {
			f := new(deliverypb.Funnel)
			if err := decodePB(raw, f); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "push %s targeted=%d sent=%d delivered=%d opened=%d expired=%d offline=%d recalled=%v expires=%s\n",
				f.PushId, f.Targeted, f.Sent, f.Delivered, f.Opened, f.Expired, f.Offline, f.Recalled, msTime(f.ExpiresMs))
			return nil
		})
	case "recalled":
		if _, err := parseInterleaved(fs, args[1:]); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/pushes/recalled", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				Recalled []string `json:"recalled"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			for _, id := range out.Recalled {
				fmt.Fprintln(c.out, id)
			}
			return nil
		})
	}
	return fmt.Errorf("push %q: want send, dry-run, recall, recalled or funnel: %w", sub, errUsage)
}

func (c *cli) pushSend(ctx context.Context, fs *flag.FlagSet, asJSON *bool, sub string, args []string) error {
	file := fs.String("file", "", "the push as JSON (a deliverypb.Push in protojson; - for stdin); excludes the other push flags but --id")
	id := fs.String("id", "", "push id: the idempotency key, and the name recalls use (default: generated)")
	users := fs.String("users", "", "audience: these users' devices, comma-separated")
	devices := fs.String("devices", "", "audience: these devices, comma-separated")
	segment := fs.String("segment", "", "audience: the members of a segment")
	everyone := fs.Bool("everyone", false, "audience: every device")
	title := fs.String("title", "", "title template ({{name}} is replaced by a variable)")
	body := fs.String("body", "", "body template")
	vars := map[string]string{}
	fs.Func("var", "a template variable, name=value (repeat the flag for more)", func(s string) error {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return fmt.Errorf("%q: want name=value", s)
		}
		vars[k] = v
		return nil
	})
	action := fs.String("action", "", "URI the app opens on a tap")
	collapse := fs.String("collapse", "", "collapse key: a newer push with it replaces an older undelivered one")
	priority := fs.String("priority", "normal", "normal or high")
	ttl := fs.Duration("ttl", 0, "validity (0: the server's default, 72h)")
	data := fs.String("data", "", "app data, opaque to Sluice")
	dataType := fs.String("data-type", "", "the content type of --data")
	conditions := fs.String("conditions-json", "", "attribute predicates a device must match, as a JSON rule (no whitelist, percent or window)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, 0, "push "+sub+" (--file PUSH.json | --users … --title T …)"); err != nil {
		return err
	}
	p := new(deliverypb.Push)
	if *file != "" {
		var other []string
		fs.Visit(func(f *flag.Flag) {
			if f.Name != "file" && f.Name != "id" && f.Name != "json" {
				other = append(other, "--"+f.Name)
			}
		})
		if len(other) > 0 {
			return fmt.Errorf("push %s: --file excludes %s", sub, strings.Join(other, " "))
		}
		b, err := readInput(*file)
		if err != nil {
			return err
		}
		if err := protojson.Unmarshal(b, p); err != nil {
			return fmt.Errorf("%s: %w", *file, err)
		}
	} else {
		n := 0
		for _, set := range []bool{*users != "", *devices != "", *segment != "", *everyone} {
			if set {
				n++
			}
		}
		if n != 1 {
			return fmt.Errorf("push %s: give one of --users, --devices, --segment or --everyone: %w", sub, errUsage)
		}
		switch {
		case *users != "":
			p.Audience = &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: splitList(*users)}}
		case *devices != "":
			p.Audience = &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: splitList(*devices)}}
		case *segment != "":
			p.Audience = &deliverypb.Push_Segment{Segment: *segment}
		default:
			p.Audience = &deliverypb.Push_Everyone{Everyone: true}
		}
		pr, ok := deliverypb.Priority_value["PRIORITY_"+strings.ToUpper(*priority)]
		if !ok {
			return fmt.Errorf("--priority %q: want normal or high", *priority)
		}
		p.Title, p.Body, p.ActionUri, p.CollapseKey, p.Priority = *title, *body, *action, *collapse, deliverypb.Priority(pr)
		p.Data, p.DataType = []byte(*data), *dataType
		if len(vars) > 0 {
			p.Vars = vars
		}
		if *ttl > 0 {
			p.ExpiresMs = time.Now().Add(*ttl).UnixMilli()
		}
		if *conditions != "" {
			p.Conditions = new(deliverypb.Rule)
			if err := protojson.Unmarshal([]byte(*conditions), p.Conditions); err != nil {
				return fmt.Errorf("--conditions-json: %w", err)
			}
		}
	}
	if *id != "" {
		p.Id = *id
	}
	if sub == "dry-run" {
		return c.dryRun(ctx, "/v1/pushes/dry-run", nil, marshalPB(p), *asJSON)
	}
	if p.Id == "" {
		p.Id = fmt.Sprintf("push-%d", time.Now().UnixNano())
	}
	return c.show(ctx, http.MethodPost, "/v1/pushes", nil, marshalPB(p), *asJSON, func(raw json.RawMessage) error {
		res := new(deliverypb.PushResult)
		if err := decodePB(raw, res); err != nil {
			return err
		}
		line := fmt.Sprintf("push %s sent targets=%d", res.PushId, res.Targets)
		if res.Job != "" {
			line += " job=" + res.Job
		}
		line += " expires=" + msTime(res.ExpiresMs)
		if res.Duplicate {
			line += " (duplicate: sent before, nothing new sent)"
		}
		fmt.Fprintln(c.out, line)
		return nil
	})
}

// ----- devices and the manifest key -----

// deviceCmd runs "device show ID [--json]".
func (c *cli) deviceCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("device", flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	if len(args) == 0 || args[0] != "show" {
		return fmt.Errorf("device show ID: %w", errUsage)
	}
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	if err := wantArgs(pos, 1, "device show ID"); err != nil {
		return err
	}
	return c.show(ctx, http.MethodGet, "/v1/devices/"+url.PathEscape(pos[0]), nil, nil, *asJSON, func(raw json.RawMessage) error {
		d := new(deliverypb.Device)
		if err := decodePB(raw, d); err != nil {
			return err
		}
		tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		for _, kv := range [][2]string{{"device", d.Device}, {"user", d.User}, {"app", d.App}, {"app_version", d.AppVersion},
			{"os", d.Os}, {"os_version", d.OsVersion}, {"model", d.Model}, {"region", d.Region}, {"network", d.Network},
			{"channel", d.Channel}, {"cpu", d.Cpu}, {"seen", msTime(d.SeenMs)}} {
			fmt.Fprintf(tw, "%s\t%s\n", kv[0], cmp(kv[1], "-"))
		}
		return tw.Flush()
	})
}

// deliveryCmd runs the delivery commands.
//
//	delivery key [--json]                          the manifest public key to pin in apps
//	delivery view DEVICE [--user U] [--os OS] …    what that device is offered now
//	delivery dry-run [rule flags] [--salt S]       how many known devices a rule reaches
func (c *cli) deliveryCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("delivery: want key, view or dry-run: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("delivery "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	switch sub {
	case "key":
		if _, err := parseInterleaved(fs, args[1:]); err != nil {
			return err
		}
		return c.show(ctx, http.MethodGet, "/v1/delivery/key", nil, nil, *asJSON, func(raw json.RawMessage) error {
			var out struct {
				PublicKey string `json:"public_key"`
				KeyID     string `json:"key_id"`
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "public_key %s\nkey_id %s\n", out.PublicKey, out.KeyID)
			return nil
		})
	case "view":
		return c.deliveryView(ctx, fs, asJSON, args[1:])
	case "dry-run":
		var rf ruleFlags
		rf.register(fs, "rule")
		salt := fs.String("salt", "", "the salt of the sticky percentage (a release's or switch's; default: the server's)")
		pos, err := parseInterleaved(fs, args[1:])
		if err != nil {
			return err
		}
		if err := wantArgs(pos, 0, "delivery dry-run [rule flags]"); err != nil {
			return err
		}
		rule, err := rf.rule("rule")
		if err != nil {
			return err
		}
		if rule == nil {
			rule = &deliverypb.Rule{}
		}
		var q url.Values
		if *salt != "" {
			q = url.Values{"salt": {*salt}}
		}
		return c.dryRun(ctx, "/v1/dry-run", q, marshalPB(rule), *asJSON)
	}
	return fmt.Errorf("delivery %q: want key, view or dry-run: %w", sub, errUsage)
}

func (c *cli) deliveryView(ctx context.Context, fs *flag.FlagSet, asJSON *bool, args []string) error {
	user := fs.String("user", "", "the user signed in on the device")
	attrs := map[string]*string{}
	for _, name := range []string{"app_version", "os", "os_version", "model", "region", "network", "channel", "cpu"} {
		attrs[name] = fs.String(strings.ReplaceAll(name, "_", "-"), "", "the device's "+strings.ReplaceAll(name, "_", " "))
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, 1, "delivery view DEVICE [--user U] [--os OS] …"); err != nil {
		return err
	}
	body := map[string]string{}
	for k, v := range attrs {
		if *v != "" {
			body[k] = *v
		}
	}
	b, _ := json.Marshal(body)
	q := url.Values{"device": {pos[0]}}
	if *user != "" {
		q.Set("user", *user)
	}
	return c.show(ctx, http.MethodPost, "/v1/delivery/view", q, bytes.NewReader(b), *asJSON, func(raw json.RawMessage) error {
		var out struct {
			Digest   string            `json:"digest"`
			Switches []json.RawMessage `json:"switches"`
			Releases []json.RawMessage `json:"releases"`
		}
		if err := json.Unmarshal(raw, &out); err != nil {
			return err
		}
		sws, err := decodeAll[*deliverypb.SwitchValue](out.Switches)
		if err != nil {
			return err
		}
		mans, err := decodeAll[*deliverypb.Manifest](out.Releases)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "view of device %s digest=%s\n", pos[0], out.Digest)
		for _, sv := range sws {
			fmt.Fprintf(c.out, "switch %s = %s variant=%s version=%d\n", sv.Key, valueString(sv.Value), cmp(sv.Variant, "-"), sv.Version)
		}
		for _, m := range mans {
			line := fmt.Sprintf("release %s %s kind=%s size=%d url=%s", m.Package, m.Version, enumName(m.Kind.String(), "PACKAGE_KIND_"), m.Size, m.Url)
			if m.Rollback {
				line += " rollback"
			}
			fmt.Fprintln(c.out, line)
		}
		return nil
	})
}
