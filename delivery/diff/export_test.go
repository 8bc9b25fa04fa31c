package diff

import "strings"

// Ops describes how a FormatZip patch rebuilds each entry, in order:
// "name copy old-name", "name raw", "name zstd" or "name delta
// old-name[+old-name...]".
func Ops(old, patch []byte) ([]string, error) {
	lim, _ := (*Options)(nil).limits()
	h, body, err := open(patch)
	if err != nil {
		return nil, err
	}
	ot, err := readTree(old, lim)
	if err != nil {
		return nil, err
	}
	entries, _, err := readManifest(body, ot, h, lim)
	if err != nil {
		return nil, err
	}
	var ops []string
	for _, e := range entries {
		switch e.op {
		case opCopy:
			ops = append(ops, e.name+" copy "+ot.sorted[e.old].f.Name)
		case opRaw:
			ops = append(ops, e.name+" raw")
		case opZstd:
			ops = append(ops, e.name+" zstd")
		case opDelta:
			var names []string
			for _, i := range e.bases {
				names = append(names, ot.sorted[i].f.Name)
			}
			ops = append(ops, e.name+" delta "+strings.Join(names, "+"))
		}
	}
	return ops, nil
}
