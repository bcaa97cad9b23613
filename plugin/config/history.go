package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/plugin/kek"
)

// HistorySuffix ends the name of the primary-key history in Config.StateDir: the file
// is the socket's file name plus HistorySuffix ("kms.sock.primary-key-history.json"),
// so two hwkms processes whose sockets share a directory (two plugins on one host)
// keep separate histories.
const HistorySuffix = ".primary-key-history.json"

// historyVersion is the format version History writes. Every version it ever wrote
// stays readable.
const historyVersion = 1

// MaxHistory bounds the number of key_ids the history keeps. When a new primary would
// make it longer, the oldest entry is dropped (and logged by the caller): after that
// many rotations the oldest key_id is no longer protected from coming back. With
// key_ids of at most kek.MaxKeyIDLen bytes the file stays below maxHistorySize.
const MaxHistory = 256

// maxHistorySize bounds the history file read: MaxHistory quoted key_ids of the
// longest length (JSON may escape a byte as \u00XX, six bytes) plus the envelope.
const maxHistorySize = MaxHistory*(6*kek.MaxKeyIDLen+3) + 256

// ErrPrimaryReused means a key_id that was primary before, and was then replaced by
// another, would become primary again. kube-apiserver requires that a key_id is never
// reused.
var ErrPrimaryReused = errors.New("key_id was primary before and was replaced")

// ErrHistoryUnreadable means the primary-key history exists but cannot be read or
// parsed. hwkms refuses to start on it: starting with an empty history would allow a
// replaced key_id to become primary again.
var ErrHistoryUnreadable = errors.New("primary-key history is unreadable")

// historyBody is the file format: {"version":1,"primaries":["oldest",...,"latest"]}.
type historyBody struct {
	Version   int      `json:"version"`
	Primaries []string `json:"primaries"`
}

// History is the ordered list of key_ids that have been primary, oldest first, kept
// in a file so the rule "a replaced primary never comes back" holds across restarts.
// A History with no path is kept in memory only. It is safe for concurrent use.
type History struct {
	path string

	mu  sync.Mutex
	ids []string
}

// HistoryPath returns the path of the primary-key history for c: in c.StateDir, named
// after the socket (HistorySuffix).
func (c *Config) HistoryPath() string {
	return filepath.Join(c.stateDir(), filepath.Base(c.Socket.Path)+HistorySuffix)
}

// stateDir is StateDir, or the socket's directory for a Config that was not parsed
// (Parse applies that default).
func (c *Config) stateDir() string {
	if c.StateDir != "" {
		return c.StateDir
	}
	return filepath.Dir(c.Socket.Path)
}

// OpenHistory reads the history at path; a missing file is an empty history (it is
// created at the first Admit). A file that exists but cannot be read, is not of a known
// version or does not parse is an error wrapping ErrHistoryUnreadable: the caller must
// refuse to serve rather than start afresh. path "" gives an in-memory history.
func OpenHistory(path string) (*History, error) {
	h := &History{path: path}
	if path == "" {
		return h, nil
	}
	data, err := files.ReadSecret(path, files.SecretOptions{MaxBytes: maxHistorySize})
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return h, nil
	case err != nil:
		return nil, historyError(path, err)
	}
	ids, err := parseHistory(data)
	if err != nil {
		return nil, historyError(path, err)
	}
	h.ids = ids
	return h, nil
}

func historyError(path string, err error) error {
	return fmt.Errorf("%w: %s: %w; refusing to serve, since without the history a replaced key_id could become primary again (to reset it deliberately, see \"Primary-key history\" in docs/reliability.md)", ErrHistoryUnreadable, path, err)
}

// parseHistory decodes a history file strictly.
func parseHistory(data []byte) ([]string, error) {
	var probe struct {
		Version *int `json:"version"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("not JSON: %w", err)
	}
	if probe.Version == nil {
		return nil, errors.New("no \"version\" field")
	}
	if *probe.Version != historyVersion {
		return nil, fmt.Errorf("unknown version %d (this hwkms reads version %d)", *probe.Version, historyVersion)
	}
	var b historyBody
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return nil, fmt.Errorf("version %d: %w", historyVersion, err)
	}
	if dec.More() {
		return nil, errors.New("data after the JSON object")
	}
	if len(b.Primaries) > MaxHistory {
		return nil, fmt.Errorf("%d entries, more than the %d hwkms keeps", len(b.Primaries), MaxHistory)
	}
	for i, id := range b.Primaries {
		if id == "" || len(id) > kek.MaxKeyIDLen {
			return nil, fmt.Errorf("primaries[%d]: key_id of %d bytes (want 1-%d)", i, len(id), kek.MaxKeyIDLen)
		}
		if j := slices.Index(b.Primaries[:i], id); j >= 0 {
			return nil, fmt.Errorf("primaries[%d]: key_id %s is also primaries[%d]", i, id, j)
		}
	}
	return b.Primaries, nil
}

// marshalHistory encodes ids in the current version.
func marshalHistory(ids []string) ([]byte, error) {
	if ids == nil {
		ids = []string{}
	}
	data, err := json.MarshalIndent(historyBody{Version: historyVersion, Primaries: ids}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// Path returns the history's file, "" if it is kept in memory only.
func (h *History) Path() string { return h.path }

// Primaries returns the key_ids that have been primary, oldest first.
func (h *History) Primaries() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.ids)
}

// Check returns an error wrapping ErrPrimaryReused if id appears in the history but is
// not its latest entry. It changes nothing.
func (h *History) Check(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.checkLocked(id)
}

func (h *History) checkLocked(id string) error {
	n := len(h.ids)
	if n == 0 || h.ids[n-1] == id || !slices.Contains(h.ids, id) {
		return nil
	}
	where := "this process's history"
	if h.path != "" {
		where = h.path
	}
	return fmt.Errorf("keys[0]: primary key_id %s: %w by key_id %s (recorded in %s); kube-apiserver requires that a key_id is never reused, so put %s first again or create a new key", id, ErrPrimaryReused, h.ids[n-1], where, h.ids[n-1])
}

// Admit makes id the latest primary: it returns Check's error if id may not be
// primary, and otherwise, if id is not already the latest entry, appends it and writes
// the file (files.WriteFile: durable, 0600) before returning. dropped is the oldest
// key_id if the history was full and lost it, else "". If the write fails the history
// is unchanged and the error says so: the caller must not serve id as primary, since
// after a restart it would not be known.
func (h *History) Admit(id string) (dropped string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.checkLocked(id); err != nil {
		return "", err
	}
	if n := len(h.ids); n > 0 && h.ids[n-1] == id {
		return "", nil
	}
	next := append(slices.Clone(h.ids), id)
	if len(next) > MaxHistory {
		dropped = next[0]
		next = next[len(next)-MaxHistory:]
	}
	if h.path != "" {
		data, err := marshalHistory(next)
		if err != nil {
			return "", fmt.Errorf("primary-key history %s: %w", h.path, err)
		}
		if err := os.MkdirAll(filepath.Dir(h.path), 0o750); err != nil {
			return "", fmt.Errorf("primary-key history %s: %w", h.path, err)
		}
		if err := files.WriteFile(h.path, data, files.WriteOptions{Mode: 0o600}); err != nil {
			return "", fmt.Errorf("primary-key history: recording key_id %s as primary: %w", id, err)
		}
	}
	h.ids = next
	return dropped, nil
}
