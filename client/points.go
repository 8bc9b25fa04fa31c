package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// SyncPoint is the highest id of one business the client has processed,
// with the epoch of the oplog shard that id belongs to; or, as a topic
// cursor, the highest id of one topic, with the epoch of the topic stream.
// Ids are comparable only within one epoch.
type SyncPoint struct {
	ID    uint64 `json:"id"`
	Epoch uint64 `json:"epoch"`
}

// stateFile is the name of the sync point file in Config.StateDir.
const stateFile = "points.json"

// stateVersion is the version of the file's format. Fields added since
// are optional and keep it: a file without them loads as before, and a
// client that does not know them ignores them (it then drops them at its
// next save, which costs a resync of what they covered, nothing more).
const stateVersion = 1

// stateDoc is the file's content: the sync points, the user bound when
// they were earned (ids of a user's businesses mean nothing for another
// user), and the topic cursors (ids of topic streams, the same for every
// user; absent in files of older clients).
type stateDoc struct {
	Version int                  `json:"version"`
	User    string               `json:"user"`
	Points  map[string]SyncPoint `json:"points"`
	Topics  map[string]SyncPoint `json:"topics,omitempty"`
}

// loadPoints reads the state persisted in dir: none if there is no file
// yet. It removes temporary files a crash may have left.
func loadPoints(dir string) (stateDoc, error) {
	removeTemps(dir, stateFile)
	path := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return stateDoc{Version: stateVersion, Points: map[string]SyncPoint{}, Topics: map[string]SyncPoint{}}, nil
	}
	if err != nil {
		return stateDoc{}, fmt.Errorf("client: read state: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return stateDoc{}, fmt.Errorf("client: %s: %v: %w", path, err, ErrBadState)
	}
	if doc.Version != stateVersion {
		return stateDoc{}, fmt.Errorf("client: %s: format version %d, want %d: %w", path, doc.Version, stateVersion, ErrBadState)
	}
	if doc.Points == nil {
		doc.Points = map[string]SyncPoint{}
	}
	if doc.Topics == nil {
		doc.Topics = map[string]SyncPoint{}
	}
	return doc, nil
}

// savePoints replaces the state file in dir atomically with the sync
// points earned under user and the topic cursors (see writeFileAtomic).
func savePoints(dir, user string, points, topics map[string]SyncPoint) error {
	b, err := json.Marshal(stateDoc{Version: stateVersion, User: user, Points: points, Topics: topics})
	if err != nil {
		return fmt.Errorf("client: encode state: %w", err)
	}
	return writeFileAtomic(dir, stateFile, b)
}

// removeTemps removes the temporary files of name in dir that a crash
// during writeFileAtomic may have left.
func removeTemps(dir, name string) {
	if tmps, err := filepath.Glob(filepath.Join(dir, name+".tmp-*")); err == nil {
		for _, t := range tmps {
			_ = os.Remove(t)
		}
	}
}

// writeFileAtomic replaces the file name in dir with b: it writes a
// temporary file, syncs it, renames it over the old one and syncs the
// directory, so a crash leaves either the old content or the new one.
func writeFileAtomic(dir, name string, b []byte) (err error) {
	f, err := os.CreateTemp(dir, name+".tmp-*")
	if err != nil {
		return fmt.Errorf("client: write %s: %w", name, err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(b); err != nil {
		return fmt.Errorf("client: write %s: %w", name, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("client: sync %s: %w", name, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("client: close %s: %w", name, err)
	}
	if err = os.Rename(f.Name(), filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("client: rename %s: %w", name, err)
	}
	// Make the rename durable. Best effort: some systems cannot sync a
	// directory, and the data itself is already on disk.
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
