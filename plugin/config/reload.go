package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/hwkms/hwkms/plugin"
)

// Reloader reloads the keys of one config file into one running Service, one reload at
// a time. It checks every new primary against the History of key_ids that have been
// primary (kept in a file by serve, so it holds across restarts), so a demoted primary
// is never made primary again (kube-apiserver requires that a key_id is never reused:
// A -> B -> A is refused; create a new key instead), and records each new primary in
// the History before it serves it.
//
// A reload builds the new keyring completely (opens every key, runs a real round trip
// on the new primary) before it swaps it in; on any error the running keyring keeps
// serving, untouched. The old keyring's Close waits for requests still using it, so a
// reload never fails an in-flight request.
type Reloader struct {
	svc  *plugin.Service
	path string
	log  *slog.Logger
	// OnReload, if set, is called after every reload attempt with its error (nil on
	// success), for metrics. Set it before Watch or Reload is first called.
	OnReload func(err error)

	mu      sync.Mutex
	cfg     *Config
	data    []byte   // bytes of the file that cfg came from
	history *History // key_ids that have been primary, oldest first
	failing bool     // the latest reload attempt failed
	// openTimeout bounds opening the new keys (OpenTimeout; tests shorten it).
	openTimeout time.Duration
}

// NewReloader returns a Reloader for svc, which is serving cfg loaded from path. hist
// is the history the serving primary was admitted to (History.Admit); nil means an
// in-memory history that starts with the serving primary, which protects this process
// only.
func NewReloader(svc *plugin.Service, cfg *Config, path string, log *slog.Logger, hist *History) *Reloader {
	data, _ := readConfig(path)
	if hist == nil {
		hist = &History{ids: []string{svc.Keyring().Primary().ID()}}
	}
	return &Reloader{
		svc:         svc,
		path:        path,
		log:         log,
		cfg:         cfg,
		data:        data,
		history:     hist,
		openTimeout: OpenTimeout,
	}
}

// Config returns the config currently serving.
func (r *Reloader) Config() *Config {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg
}

// ErrUnchanged is returned by Reload(ctx, false) when the file has not changed.
var ErrUnchanged = errors.New("config file unchanged")

// Reload re-reads the config file and swaps in its keys. Unless force is set, a file
// whose bytes have not changed since the last successful load is skipped with
// ErrUnchanged (file-change events often come in bursts).
func (r *Reloader) Reload(ctx context.Context, force bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.reloadLocked(ctx, force)
	if errors.Is(err, ErrUnchanged) {
		if r.failing {
			// The file is back to the bytes being served: the failed reload's file is
			// gone, so Status must stop quoting its error.
			r.failing = false
			r.svc.SetReloadError(nil)
			r.log.Info("config file is back to the serving config; the failed reload no longer applies", "config", r.path)
		}
		return err
	}
	r.failing = err != nil
	r.svc.SetReloadError(err)
	if r.OnReload != nil {
		r.OnReload(err)
	}
	if err != nil {
		r.log.Error("config reload failed; still serving the previous keys", "config", r.path, "err", err,
			"primary_key_id", r.svc.Keyring().Primary().ID())
	}
	return err
}

func (r *Reloader) reloadLocked(ctx context.Context, force bool) error {
	data, err := readConfig(r.path)
	if err != nil {
		return err
	}
	if !force && bytes.Equal(data, r.data) {
		return ErrUnchanged
	}
	cfg, err := Parse(data)
	if err != nil {
		return fmt.Errorf("config %s: %w", r.path, err)
	}
	ring, err := OpenKeyringWithin(ctx, cfg, r.openTimeout)
	if err != nil {
		return err
	}
	current := r.svc.Keyring().Primary().ID()
	next := ring.Primary().ID()
	if next != current {
		if err := r.history.Check(next); err != nil {
			ring.Close()
			return err
		}
	}
	pctx, cancel := context.WithTimeout(ctx, cfg.Health.Timeout.D())
	h := plugin.Probe(pctx, ring.Primary())
	cancel()
	if !h.OK {
		ring.Close()
		return fmt.Errorf("keys[0]: new primary key_id %s failed its health round trip: %w", next, h.Err)
	}
	if next != current {
		// Recorded before it serves: a primary that served but is missing from the
		// file could come back after a restart.
		dropped, err := r.history.Admit(next)
		if err != nil {
			ring.Close()
			return err
		}
		if dropped != "" {
			r.log.Warn("primary-key history is full; its oldest key_id is no longer protected from reuse", "dropped_key_id", dropped, "history", r.history.Path(), "max", MaxHistory)
		}
	}
	if r.cfg.Socket != cfg.Socket || r.cfg.Log != cfg.Log || r.cfg.Timeout != cfg.Timeout || r.cfg.ShutdownTimeout != cfg.ShutdownTimeout || r.cfg.Metrics != cfg.Metrics || r.cfg.Health != cfg.Health || r.cfg.StateDir != cfg.StateDir {
		r.log.Warn("config reload: only the keys are reloaded; socket, log, metrics, timeout, health and stateDir changes take effect after a restart")
	}
	old := r.svc.SwapKeyring(ring, h)
	r.cfg, r.data = cfg, data
	r.log.Info("config reloaded", "primary_key_id", next, "previous_primary_key_id", current, "keys", len(cfg.Keys))
	LogMechanisms(r.log, ring)
	go func() {
		if err := old.Close(); err != nil {
			r.log.Warn("closing previous keyring", "err", err)
		}
	}()
	return nil
}

// debounce is how long Watch waits after a file event before reloading, so an editor's
// write-rename sequence or a ConfigMap's symlink swap is one reload.
const debounce = 250 * time.Millisecond

// Watch reloads when the config file changes (it watches the file's directory, which
// also catches editors that replace the file and Kubernetes ConfigMap symlink swaps)
// and whenever trigger receives (SIGHUP), until ctx is done. Explicit triggers always
// reload; file events reload only if the bytes changed. If the directory cannot be
// watched, Watch logs it and serves triggers only.
func (r *Reloader) Watch(ctx context.Context, trigger <-chan struct{}) {
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w, err := r.watch(); err != nil {
		r.log.Warn("config file changes are not watched; reload with SIGHUP", "err", err)
	} else {
		defer w.Close()
		events, errs = w.Events, w.Errors
	}
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-trigger:
			r.Reload(ctx, true)
		case ev := <-events:
			if r.relevant(ev) {
				timer = time.After(debounce)
			}
		case err := <-errs:
			r.log.Warn("config watch error", "err", err)
		case <-timer:
			timer = nil
			r.Reload(ctx, false)
		}
	}
}

func (r *Reloader) watch() (*fsnotify.Watcher, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	if err := w.Add(filepath.Dir(r.path)); err != nil {
		w.Close()
		return nil, fmt.Errorf("watch %s: %w", filepath.Dir(r.path), err)
	}
	return w, nil
}

// relevant reports whether a directory event may have changed the config file: a
// change of the file itself, or of a symlink layer (ConfigMap "..data") in its dir.
func (r *Reloader) relevant(ev fsnotify.Event) bool {
	if ev.Has(fsnotify.Chmod) && !ev.Has(fsnotify.Write) {
		return false
	}
	name := filepath.Clean(ev.Name)
	return name == filepath.Clean(r.path) || filepath.Base(name) == "..data"
}
