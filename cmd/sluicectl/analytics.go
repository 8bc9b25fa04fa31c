package main

// Analytics commands over the admin API (routes in
// cmd/sluiced/admin_analytics.go): the aggregates of the tracking events
// apps upload to /v1/analytics.

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/oplog"
)

// Periods as the aggregates name them (UTC).
const (
	dayLayout   = "20060102"
	monthLayout = "200601"
)

// topN is how many pages and page transitions counters shows.
const topN = 10

// period is a day, an ISO week or a month, as the aggregates key it.
type period struct {
	name string // 20261121, 2026W47 or 202611
	kind string // "day", "ISO week" or "month"
	// days are the days of the period up to today (a day: itself).
	days []string
}

var weekRE = regexp.MustCompile(`^(\d{4})[Ww](\d{1,2})$`)

// parsePeriod reads a day (20261121), an ISO week (2026W47), a month
// (202611), "today" or "yesterday"; days are UTC, as the aggregates count
// them, and now says which day is today.
func parsePeriod(s string, now time.Time) (period, error) {
	now = now.UTC()
	today := now.Format(dayLayout)
	switch s {
	case "today":
		return period{name: today, kind: "day", days: []string{today}}, nil
	case "yesterday":
		d := now.AddDate(0, 0, -1).Format(dayLayout)
		return period{name: d, kind: "day", days: []string{d}}, nil
	}
	span := func(from time.Time, n int) []string {
		var days []string
		for i := range n {
			if d := from.AddDate(0, 0, i).Format(dayLayout); d <= today {
				days = append(days, d)
			}
		}
		return days
	}
	if m := weekRE.FindStringSubmatch(s); m != nil {
		y, _ := strconv.Atoi(m[1])
		w, _ := strconv.Atoi(m[2])
		// Week 1 holds January 4th; weeks start on Monday.
		jan4 := time.Date(y, time.January, 4, 0, 0, 0, 0, time.UTC)
		monday := jan4.AddDate(0, 0, -((int(jan4.Weekday())+6)%7)+7*(w-1))
		if gy, gw := monday.ISOWeek(); w < 1 || gy != y || gw != w {
			return period{}, fmt.Errorf("period %q: %d has no ISO week %d", s, y, w)
		}
		return period{name: fmt.Sprintf("%04dW%02d", y, w), kind: "ISO week", days: span(monday, 7)}, nil
	}
	if len(s) == len(dayLayout) && isDigits(s) {
		if _, err := time.Parse(dayLayout, s); err != nil {
			return period{}, fmt.Errorf("period %q: not a date", s)
		}
		return period{name: s, kind: "day", days: []string{s}}, nil
	}
	if len(s) == len(monthLayout) && isDigits(s) {
		t, err := time.Parse(monthLayout, s)
		if err != nil {
			return period{}, fmt.Errorf("period %q: not a month", s)
		}
		return period{name: s, kind: "month", days: span(t, t.AddDate(0, 1, -1).Day())}, nil
	}
	return period{}, periodError(s)
}

func periodError(s string) error {
	return fmt.Errorf("period %q: want a day (20261121), an ISO week (2026W47), a month (202611), today or yesterday", s)
}

// parseDay reads a day: 20261121, today or yesterday.
func parseDay(s string, now time.Time) (string, error) {
	p, err := parsePeriod(s, now)
	if err == nil && p.kind != "day" {
		err = fmt.Errorf("%q is a %s: want a day (20261121), today or yesterday", s, p.kind)
	}
	return p.name, err
}

func isDigits(s string) bool {
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return s != ""
}

// counters is the admin API's answer for a period.
type counters struct {
	App      string            `json:"app"`
	Period   string            `json:"period"`
	Counters map[string]uint64 `json:"counters"`
}

// analyticsCmd runs the analytics commands.
//
//	analytics counters APP PERIOD [--json]            PERIOD: 20261121, 2026W47, 202611, today, yesterday
//	analytics retention APP COHORT [--days N] [--json]
//	analytics crashes APP DAY [--json]
func (c *cli) analyticsCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("analytics: want counters, retention or crashes: %w", errUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("analytics "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	asJSON := fs.Bool("json", false, "print JSON: the admin API's answer (counters of a week or month: also each day's)")
	days := fs.Int("days", 30, "retention: days after the cohort's day, 0-366")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	now := time.Now()
	app := func() (string, error) {
		if !oplog.ValidID(pos[0]) {
			return "", fmt.Errorf("analytics %s: app %q: want 1-%d of [A-Za-z0-9_-]", sub, pos[0], oplog.MaxIDLen)
		}
		return pos[0], nil
	}
	switch sub {
	case "counters":
		if err := wantArgs(pos, 2, "analytics counters APP PERIOD"); err != nil {
			return err
		}
		a, err := app()
		if err != nil {
			return err
		}
		p, err := parsePeriod(pos[1], now)
		if err != nil {
			return err
		}
		return c.analyticsCounters(ctx, a, p, *asJSON)
	case "retention":
		if err := wantArgs(pos, 2, "analytics retention APP COHORT [--days N]"); err != nil {
			return err
		}
		a, err := app()
		if err != nil {
			return err
		}
		cohort, err := parseDay(pos[1], now)
		if err != nil {
			return err
		}
		if *days < 0 || *days > 366 {
			return fmt.Errorf("analytics retention: --days %d: want 0-366", *days)
		}
		return c.analyticsRetention(ctx, a, cohort, *days, now, *asJSON)
	case "crashes":
		if err := wantArgs(pos, 2, "analytics crashes APP DAY"); err != nil {
			return err
		}
		a, err := app()
		if err != nil {
			return err
		}
		day, err := parseDay(pos[1], now)
		if err != nil {
			return err
		}
		return c.analyticsCrashes(ctx, a, day, *asJSON)
	}
	return fmt.Errorf("analytics %q: want counters, retention or crashes: %w", sub, errUsage)
}

func (c *cli) periodCounters(ctx context.Context, app, name string) (counters, error) {
	var out counters
	err := c.get(ctx, "/v1/analytics/"+url.PathEscape(app)+"/periods/"+url.PathEscape(name), nil, &out)
	return out, err
}

// analyticsCounters prints a period's figures. A day shows its counters
// and the active users of its week and month; a week or a month shows
// its active users and the sums of its days' counters (the aggregates
// count per day), with active user-days in the breakdowns.
func (c *cli) analyticsCounters(ctx context.Context, app string, p period, asJSON bool) error {
	top, err := c.periodCounters(ctx, app, p.name)
	if err != nil {
		return err
	}
	if p.kind == "day" {
		if asJSON {
			return json.NewEncoder(c.out).Encode(top)
		}
		t, _ := time.Parse(dayLayout, p.name)
		y, w := t.ISOWeek()
		week, err := c.periodCounters(ctx, app, fmt.Sprintf("%04dW%02d", y, w))
		if err != nil {
			return err
		}
		month, err := c.periodCounters(ctx, app, t.Format(monthLayout))
		if err != nil {
			return err
		}
		c.printCounters(app, p, top.Counters, map[string]uint64{"wau": week.Counters["wau"], "mau": month.Counters["mau"]},
			week.Period, month.Period, nil)
		return nil
	}
	perDay := map[string]map[string]uint64{}
	sum := map[string]uint64{}
	for _, d := range p.days {
		dc, err := c.periodCounters(ctx, app, d)
		if err != nil {
			return err
		}
		perDay[d] = dc.Counters
		for k, v := range dc.Counters {
			sum[k] += v
		}
	}
	if asJSON {
		return json.NewEncoder(c.out).Encode(map[string]any{"app": top.App, "period": top.Period, "counters": top.Counters, "days": perDay})
	}
	c.printCounters(app, p, sum, top.Counters, "", "", perDay)
	return nil
}

// printCounters prints the figures of c (a day's, or the sum of a
// period's days in perDay), with the active users of active.
func (c *cli) printCounters(app string, p period, sum, active map[string]uint64, week, month string, perDay map[string]map[string]uint64) {
	fmt.Fprintf(c.out, "%s %s (%s, UTC", app, p.name, p.kind)
	if perDay != nil {
		span := "no day yet"
		if len(p.days) > 0 {
			span = fmt.Sprintf("%s-%s", p.days[0], p.days[len(p.days)-1])
		}
		fmt.Fprintf(c.out, "; counters summed over %d days, %s", len(p.days), span)
	}
	fmt.Fprintln(c.out, ")")
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	if perDay == nil {
		fmt.Fprintf(tw, "active users\tDAU %d, WAU %d (%s), MAU %d (%s)\n", sum["dau"], active["wau"], week, active["mau"], month)
	} else {
		var most uint64
		mostDay := "-"
		for _, d := range p.days {
			if n := perDay[d]["dau"]; n > most {
				most, mostDay = n, d
			}
		}
		au := "WAU " + strconv.FormatUint(active["wau"], 10)
		if p.kind == "month" {
			au = "MAU " + strconv.FormatUint(active["mau"], 10)
		}
		fmt.Fprintf(tw, "active users\t%s; DAU mean %.1f, max %d (%s)\n", au, float64(sum["dau"])/float64(max(len(p.days), 1)), most, mostDay)
	}
	fmt.Fprintf(tw, "new users\t%d\n", sum["new"])
	avg := "-"
	if n := sum["sessions@"]; n > 0 {
		avg = (time.Duration(sum["session-ms"]/n) * time.Millisecond).Round(time.Second).String()
	}
	fmt.Fprintf(tw, "sessions\t%d (average length %s)\n", sum["sessions@"], avg)
	fmt.Fprintf(tw, "crashes\t%d (%d of %d sessions crashed: crash-free sessions %s)\n", sum["crashes@"], sum["crashed-sessions@"],
		sum["sessions@"], crashFree(sum["sessions@"], sum["crashed-sessions@"]))
	fmt.Fprintf(tw, "freezes\t%d (%d of %d sessions froze)\n", sum["freezes@"], sum["frozen-sessions@"], sum["sessions@"])
	_ = tw.Flush()

	c.topTable(sum, "page:", fmt.Sprintf("top %d pages", topN), []string{"PAGE", "VIEWS"}, topN, nil)
	c.topTable(sum, "path:", fmt.Sprintf("top %d page transitions", topN), []string{"FROM", "TO", "COUNT"}, topN, func(k string) []string {
		from, to, _ := strings.Cut(k, " > ")
		return []string{from, to}
	})
	c.topTable(sum, "event:", "custom events", []string{"EVENT", "COUNT"}, 0, nil)
	users := "users"
	if perDay != nil {
		users = "user-days"
	}
	for _, dim := range analytics.Dimensions {
		c.shareTable(sum, "dau:"+dim+"=", "active "+users+" by "+dim, strings.ToUpper(dim)+"\t"+strings.ToUpper(users), sum["dau"], nil)
	}
	c.shareTable(sum, "dau:release=", "active "+users+" by release", "PACKAGE\tVERSION\t"+strings.ToUpper(users), sum["dau"], func(k string) []string {
		pkg, ver, _ := strings.Cut(k, "=")
		return []string{pkg, ver}
	})
}

// crashFree formats the share of sessions that did not crash.
func crashFree(sessions, crashed uint64) string {
	if sessions == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f%%", 100*(1-float64(crashed)/float64(sessions)))
}

// counted is one counter of a family (pages, events, ...).
type counted struct {
	name string
	n    uint64
}

// family returns the counters whose name starts with prefix, most first.
func family(m map[string]uint64, prefix string) []counted {
	var out []counted
	for k, v := range m {
		if name, ok := strings.CutPrefix(k, prefix); ok {
			out = append(out, counted{name, v})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].n != out[j].n {
			return out[i].n > out[j].n
		}
		return out[i].name < out[j].name
	})
	return out
}

// topTable prints the counters of a family, the n biggest (0: all); split
// turns a name into its columns (nil: one column).
func (c *cli) topTable(m map[string]uint64, prefix, title string, header []string, n int, split func(string) []string) {
	rows := family(m, prefix)
	fmt.Fprintf(c.out, "\n%s", title)
	if n > 0 && len(rows) > n {
		fmt.Fprintf(c.out, " (of %d)", len(rows))
		rows = rows[:n]
	}
	fmt.Fprintln(c.out)
	if len(rows) == 0 {
		fmt.Fprintln(c.out, "  (none)")
		return
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		cols := []string{r.name}
		if split != nil {
			cols = split(r.name)
		}
		fmt.Fprintf(tw, "%s\t%d\n", strings.Join(cols, "\t"), r.n)
	}
	_ = tw.Flush()
}

// shareTable prints a breakdown of active users with each value's share
// of total, under header; split turns a value into its columns (nil: one
// column).
func (c *cli) shareTable(m map[string]uint64, prefix, title, header string, total uint64, split func(string) []string) {
	rows := family(m, prefix)
	fmt.Fprintf(c.out, "\n%s\n", title)
	if len(rows) == 0 {
		fmt.Fprintln(c.out, "  (none)")
		return
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\tSHARE\n", header)
	for _, r := range rows {
		share := "-"
		if total > 0 {
			share = fmt.Sprintf("%.1f%%", 100*float64(r.n)/float64(total))
		}
		cols := []string{r.name}
		if split != nil {
			cols = split(r.name)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\n", strings.Join(cols, "\t"), r.n, share)
	}
	_ = tw.Flush()
}

// retentionColumns is how many days one row of the retention table holds.
const retentionColumns = 16

// analyticsRetention prints a cohort's active users day by day, as counts
// and as a share of day 0; days after today show "-".
func (c *cli) analyticsRetention(ctx context.Context, app, cohort string, days int, now time.Time, asJSON bool) error {
	path := "/v1/analytics/" + url.PathEscape(app) + "/retention/" + url.PathEscape(cohort)
	return c.show(ctx, http.MethodGet, path, url.Values{"days": {strconv.Itoa(days)}}, nil, asJSON, func(raw json.RawMessage) error {
		var out struct {
			Active []uint64 `json:"active"`
		}
		if err := json.Unmarshal(raw, &out); err != nil {
			return err
		}
		start, _ := time.Parse(dayLayout, cohort)
		today := now.UTC().Format(dayLayout)
		var size uint64
		if len(out.Active) > 0 {
			size = out.Active[0]
		}
		fmt.Fprintf(c.out, "retention of %s, cohort %s (users first seen that day, UTC): %d users\n", app, cohort, size)
		for at := 0; at < len(out.Active); at += retentionColumns {
			if at > 0 {
				fmt.Fprintln(c.out)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', tabwriter.AlignRight)
			row := func(name string, cell func(n int) string) {
				fmt.Fprint(tw, name)
				for n := at; n < min(at+retentionColumns, len(out.Active)); n++ {
					fmt.Fprint(tw, "\t"+cell(n))
				}
				fmt.Fprintln(tw, "\t")
			}
			future := func(n int) bool { return start.AddDate(0, 0, n).Format(dayLayout) > today }
			row("DAY", strconv.Itoa)
			row("USERS", func(n int) string {
				if future(n) {
					return "-"
				}
				return strconv.FormatUint(out.Active[n], 10)
			})
			row("%", func(n int) string {
				if future(n) || size == 0 {
					return "-"
				}
				return fmt.Sprintf("%.1f", 100*float64(out.Active[n])/float64(size))
			})
			_ = tw.Flush()
		}
		return nil
	})
}

// analyticsCrashes prints a day's crash figures: all sessions, then per
// app version and per release (package and version), sessions counted on
// the day they started.
func (c *cli) analyticsCrashes(ctx context.Context, app, day string, asJSON bool) error {
	return c.show(ctx, http.MethodGet, "/v1/analytics/"+url.PathEscape(app)+"/crashes/"+url.PathEscape(day), nil, nil, asJSON, func(raw json.RawMessage) error {
		var out struct {
			Slices map[string]analytics.CrashRate `json:"slices"`
		}
		if err := json.Unmarshal(raw, &out); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "crashes and freezes of %s on %s (UTC; sessions counted on the day they started)\n", app, day)
		type row struct {
			cols []string
			r    analytics.CrashRate
		}
		var versions, releases []row
		byDim := map[string][]row{} // os, model, region, network
		for s, r := range out.Slices {
			dim, val, _ := strings.Cut(s, ":")
			switch dim {
			case "":
			case "v":
				versions = append(versions, row{[]string{cmp(val, "-")}, r})
			case "r":
				pkg, ver, _ := strings.Cut(val, "=")
				releases = append(releases, row{[]string{pkg, ver}, r})
			default:
				byDim[dim] = append(byDim[dim], row{[]string{val}, r})
			}
		}
		sort.Slice(versions, func(i, j int) bool { return oplog.CompareVersions(versions[i].cols[0], versions[j].cols[0]) < 0 })
		for _, rows := range byDim {
			sort.Slice(rows, func(i, j int) bool {
				if rows[i].r.Sessions != rows[j].r.Sessions {
					return rows[i].r.Sessions > rows[j].r.Sessions
				}
				return rows[i].cols[0] < rows[j].cols[0]
			})
		}
		sort.Slice(releases, func(i, j int) bool {
			a, b := releases[i].cols, releases[j].cols
			if a[0] != b[0] {
				return a[0] < b[0]
			}
			return oplog.CompareVersions(a[1], b[1]) < 0
		})
		const figures = "SESSIONS\tCRASHED SESSIONS\tCRASH RATE\tCRASH-FREE\tCRASHES\tCRASHED USERS\tCRASH-FREE USERS\tFREEZES\tFROZEN SESSIONS\tFREEZE RATE"
		table := func(title string, header []string, rows []row) {
			fmt.Fprintf(c.out, "\n%s\n", title)
			if len(rows) == 0 {
				fmt.Fprintln(c.out, "  (none)")
				return
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, strings.Join(header, "\t")+"\t"+figures)
			for _, r := range rows {
				rate := "-"
				if r.r.Sessions > 0 {
					rate = fmt.Sprintf("%.2f%%", 100*float64(r.r.CrashedSessions)/float64(r.r.Sessions))
				}
				freeUsers := "-"
				if r.r.ActiveUsers > 0 && r.r.CrashedUsers <= r.r.ActiveUsers {
					freeUsers = fmt.Sprintf("%.2f%%", 100*r.r.CrashFreeUsers)
				}
				freezeRate := "-"
				if r.r.Sessions > 0 {
					freezeRate = fmt.Sprintf("%.2f%%", 100*float64(r.r.FrozenSessions)/float64(r.r.Sessions))
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%d\t%s\t%d\t%d\t%s\n", strings.Join(r.cols, "\t"), r.r.Sessions, r.r.CrashedSessions,
					rate, crashFree(r.r.Sessions, r.r.CrashedSessions), r.r.Crashes, r.r.CrashedUsers, freeUsers, r.r.Freezes, r.r.FrozenSessions, freezeRate)
			}
			_ = tw.Flush()
		}
		var all []row
		if r, ok := out.Slices[""]; ok {
			all = []row{{[]string{"all"}, r}}
		}
		table("all sessions", []string{"SLICE"}, all)
		table("by app version", []string{"VERSION"}, versions)
		for _, dim := range analytics.Dimensions[1:] {
			table("by "+dim, []string{strings.ToUpper(dim)}, byDim[dim])
		}
		table("by release", []string{"PACKAGE", "VERSION"}, releases)
		return nil
	})
}
