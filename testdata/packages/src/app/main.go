// Command sluice-demo-app is the small program built twice to make the
// binary test packages app-v1.bin and app-v2.bin (see ../../README.md).
// The two builds differ as a real release would: the version string
// (-ldflags -X main.version=...) and one function (score_v1.go against
// score_v2.go, chosen by the build tag v2).
package main

import (
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// version is set at build time.
var version = "dev"

// Item is one row of the input: a product with its counters.
type Item struct {
	ID       string
	Title    string
	Views    int
	Clicks   int
	Orders   int
	Updated  time.Time
	Category string
}

// Report is what the program prints.
type Report struct {
	Version  string
	Items    int
	Top      []Ranked
	ByCat    map[string]int
	Skipped  int
	Computed time.Time
}

// Ranked is an item with its score.
type Ranked struct {
	ID    string
	Title string
	Score float64
}

func main() {
	top := flag.Int("top", 10, "items to report")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("sluice-demo-app", version)
		return
	}
	rep, err := run(os.Stdin, *top, time.Now())
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluice-demo-app:", err)
		os.Exit(1)
	}
	if err := rep.write(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "sluice-demo-app:", err)
		os.Exit(1)
	}
}

// write prints the report as a table.
func (rep *Report) write(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "sluice-demo-app %s: %d items, %d skipped, at %s\n", rep.Version, rep.Items, rep.Skipped, rep.Computed.Format(time.RFC3339))
	fmt.Fprintln(tw, "rank\tid\ttitle\tscore")
	for i, r := range rep.Top {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%.4f\n", i+1, r.ID, r.Title, r.Score)
	}
	cats := make([]string, 0, len(rep.ByCat))
	for c := range rep.ByCat {
		cats = append(cats, c)
	}
	sort.Strings(cats)
	for _, c := range cats {
		fmt.Fprintf(tw, "category\t%s\t%d\t\n", c, rep.ByCat[c])
	}
	return tw.Flush()
}

// run reads CSV rows of items (id, title, views, clicks, orders, updated
// in RFC 3339, category) from r and ranks them.
func run(r io.Reader, top int, now time.Time) (*Report, error) {
	rep := &Report{Version: version, ByCat: map[string]int{}, Computed: now.UTC()}
	var ranked []Ranked
	cr := csv.NewReader(r)
	cr.Comment = '#'
	cr.FieldsPerRecord = -1
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		it, err := parseItem(rec)
		if err != nil {
			rep.Skipped++
			continue
		}
		rep.Items++
		rep.ByCat[normalizeCategory(it.Category)]++
		ranked = append(ranked, Ranked{ID: it.ID, Title: it.Title, Score: score(it, now)})
	}
	sort.SliceStable(ranked, func(i, j int) bool { return ranked[i].Score > ranked[j].Score })
	if len(ranked) > top {
		ranked = ranked[:top]
	}
	rep.Top = ranked
	return rep, nil
}

// parseItem parses one CSV row.
func parseItem(rec []string) (Item, error) {
	if len(rec) != 7 {
		return Item{}, fmt.Errorf("%d fields, want 7", len(rec))
	}
	var it Item
	var err error
	it.ID, it.Title, it.Category = rec[0], rec[1], rec[6]
	counters := []*int{&it.Views, &it.Clicks, &it.Orders}
	for i, p := range counters {
		if *p, err = strconv.Atoi(strings.TrimSpace(rec[2+i])); err != nil {
			return Item{}, err
		}
	}
	if it.Updated, err = time.Parse(time.RFC3339, strings.TrimSpace(rec[5])); err != nil {
		return Item{}, err
	}
	return it, nil
}

func normalizeCategory(c string) string {
	c = strings.ToLower(strings.TrimSpace(c))
	if c == "" {
		return "other"
	}
	return c
}
