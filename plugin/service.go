package plugin

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hwkms/hwkms/plugin/kek"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"
)

// StatusVersion is the only Status.version kube-apiserver accepts for KMS v2.
const StatusVersion = "v2"

// Defaults for Options.
const (
	DefaultHealthInterval = 10 * time.Second
	DefaultProbeTimeout   = 3 * time.Second
)

// Options configures a Service. The zero value is usable.
type Options struct {
	// Logger receives one debug line per request and one warn line per failure. It never
	// receives plaintext, seeds, PINs or auth values. Default: slog.Default().
	Logger *slog.Logger
	// HealthInterval is how often Run probes the primary KEK. Default 10 s.
	HealthInterval time.Duration
	// ProbeTimeout bounds one probe. Default 3 s.
	ProbeTimeout time.Duration
	// Observer, if set, is told about every request, device operation and probe
	// (metrics).
	Observer Observer
	// DeviceReason, if set, names the device's reason for a failed request in its log
	// line (the "reason" attribute), e.g. a CKR_ or TPM_RC_ name. It must return a
	// short, non-secret name.
	DeviceReason func(b kek.Backend, err error) string
}

// Observer receives request and probe outcomes, for metrics. Implementations must be
// fast and safe for concurrent use; they must not block the request path.
type Observer interface {
	// ObserveRequest is called once per RPC with its method ("Encrypt", "Decrypt",
	// "Status"), the gRPC code returned and its duration.
	ObserveRequest(method string, code codes.Code, d time.Duration)
	// ObserveProbe is called after each health probe.
	ObserveProbe(h Health)
	// ObserveDevice is called after every KEK.Wrap ("wrap") and KEK.Unwrap ("unwrap")
	// the Service makes, for requests and probes alike, with the KEK's backend, the
	// time the call took and its error (nil on success).
	ObserveDevice(b kek.Backend, op string, d time.Duration, err error)
}

// Service implements k8s.io/kms/pkg/service.Service over a Keyring. It is safe for
// concurrent use. Status answers from the cached health probe and never touches a
// device; Encrypt and Decrypt call the device once each.
type Service struct {
	ring   atomic.Pointer[Keyring]
	health healthCache
	// swapMu orders keyring swaps with storing probe results, so a probe of a keyring
	// that a reload has just replaced never overwrites the new primary's result.
	swapMu    sync.Mutex
	reloadErr atomic.Pointer[string] // why the latest config reload failed; nil if it succeeded
	log       *slog.Logger
	obs       Observer
	panics    panicCounter
	reason    func(kek.Backend, error) string
	interval  time.Duration
	timeout   time.Duration
}

var _ service.Service = (*Service)(nil)

// NewService returns a Service serving ring. Call Run (or ProbeNow) to fill the health
// cache; until the first probe, Status reports the plugin as not yet healthy.
func NewService(ring *Keyring, opts Options) *Service {
	s := &Service{
		log:      opts.Logger,
		obs:      opts.Observer,
		reason:   opts.DeviceReason,
		interval: opts.HealthInterval,
		timeout:  opts.ProbeTimeout,
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.interval <= 0 {
		s.interval = DefaultHealthInterval
	}
	if s.timeout <= 0 {
		s.timeout = DefaultProbeTimeout
	}
	s.ring.Store(ring)
	return s
}

// Keyring returns the keyring currently serving.
func (s *Service) Keyring() *Keyring { return s.ring.Load() }

// SwapKeyring atomically installs ring, whose primary passed the probe h, and returns
// the previous keyring. The caller closes the old keyring; Keyring.Close waits for the
// requests still using it, so no in-flight request fails.
func (s *Service) SwapKeyring(ring *Keyring, h Health) *Keyring {
	s.swapMu.Lock()
	old := s.ring.Swap(ring)
	s.storeProbeLocked(h)
	s.swapMu.Unlock()
	return old
}

// SetReloadError records the outcome of the latest config reload: nil when it
// succeeded. While the serving keyring is unhealthy, Status appends a short reason name
// for the failure to its healthz (key_not_found, a CKR_ or TPM_RC_ name,
// device_timeout, device_unavailable, or config_or_device_error), so an operator sees
// both why the old keys fail and that the new ones were not taken. The full error,
// which names labels, paths and device text, goes only to the log (the caller logs
// it): healthz reaches every client of the socket.
func (s *Service) SetReloadError(err error) {
	if err == nil {
		s.reloadErr.Store(nil)
		return
	}
	r := s.reloadReason(err)
	s.reloadErr.Store(&r)
}

// reloadReason names a failed reload's cause with a bounded, non-secret name.
func (s *Service) reloadReason(err error) string {
	if errors.Is(err, kek.ErrKeyNotFound) {
		return "key_not_found"
	}
	for _, b := range []kek.Backend{kek.BackendPKCS11, kek.BackendTPM} {
		if n := s.deviceReason(b, err); strings.HasPrefix(n, "CKR_") || strings.HasPrefix(n, "TPM_RC_") {
			return clip(n, 64)
		}
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "device_timeout"
	case errors.Is(err, kek.ErrUnavailable), errors.Is(err, kek.ErrClosed):
		return "device_unavailable"
	}
	return "config_or_device_error"
}

// ReloadError returns the reason name SetReloadError recorded last, as Status would quote it: ""
// when the latest reload succeeded or none failed.
func (s *Service) ReloadError() string {
	if e := s.reloadErr.Load(); e != nil {
		return *e
	}
	return ""
}

// Health returns the cached result of the latest probe.
func (s *Service) Health() Health { return s.health.get() }

// ProbeNow probes the current primary KEK, stores and returns the result.
func (s *Service) ProbeNow(ctx context.Context) Health {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var h Health
	err := s.withRing(func(r *Keyring) error {
		h = s.guardedProbe(ctx, r.Primary())
		// Say what the device said, when it said something bounded and non-secret
		// (a CK_RV or TPM_RC name, key_not_found): "device unavailable" alone does not
		// tell a refused PIN from a destroyed key.
		if name := s.deviceReason(r.Primary().Backend(), h.Err); !h.OK && (strings.HasPrefix(name, "CKR_") || strings.HasPrefix(name, "TPM_RC_") || name == "key_not_found") {
			h.Reason += " (" + name + ")"
		}
		return nil
	})
	if err != nil {
		h = Health{Reason: "no keyring: " + reasonOf(err), At: time.Now(), Err: err}
	}
	s.recordProbe(h)
	return h
}

// guardedProbe is Probe with a recovered panic reported as a failed probe.
func (s *Service) guardedProbe(ctx context.Context, k kek.KEK) (h Health) {
	defer func() {
		if err := s.recovered(recover(), "probe"); err != nil {
			h = Health{KeyID: k.ID(), At: time.Now(), Err: err, Reason: "probe of key_id " + k.ID() + " failed: internal error"}
		}
	}()
	return Probe(ctx, s.observed(k))
}

// recordProbe stores h unless it is the result for a primary that is no longer the
// current one (a reload swapped the keyring while the probe ran): that result says
// nothing about the keys now serving.
func (s *Service) recordProbe(h Health) {
	s.swapMu.Lock()
	defer s.swapMu.Unlock()
	if h.KeyID != "" && h.KeyID != s.ring.Load().Primary().ID() {
		return
	}
	s.storeProbeLocked(h)
}

func (s *Service) storeProbeLocked(h Health) {
	prev := s.health.get()
	s.health.set(h)
	switch {
	case !h.OK:
		s.log.Warn("health probe failed", "key_id", h.KeyID, "reason", h.Reason, "err", h.Err)
	case !prev.OK || prev.KeyID != h.KeyID:
		s.log.Info("health probe ok", "key_id", h.KeyID)
	}
	if s.obs != nil {
		s.obs.ObserveProbe(h)
	}
}

// Run probes the primary KEK now and then every HealthInterval until ctx is done.
func (s *Service) Run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.ProbeNow(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// withRing runs fn with the current keyring held against Close. If a reload closes the
// keyring between loading and acquiring it, it retries with the new one.
func (s *Service) withRing(fn func(*Keyring) error) error {
	for range 1000 {
		r := s.ring.Load()
		if r.acquire() {
			defer r.release()
			return fn(r)
		}
		runtime.Gosched()
	}
	return fmt.Errorf("keyring is closed: %w", kek.ErrClosed)
}

// Status implements service.Service. It reads the cached probe; it never touches a device.
func (s *Service) Status(ctx context.Context) (_ *service.StatusResponse, rerr error) {
	start := time.Now()
	defer func() {
		if err := s.recovered(recover(), "Status"); err != nil {
			rerr = toStatus(ctx, "status", "", err)
			s.done(ctx, "Status", "", "", start, rerr, "err", err)
		}
	}()
	primary := s.ring.Load().Primary().ID()
	resp := &service.StatusResponse{Version: StatusVersion, Healthz: s.healthz(primary), KeyID: primary}
	s.done(ctx, "Status", "", primary, start, nil)
	return resp, nil
}

// Healthz returns what Status would report as healthz, without counting or logging a
// request: ok is true only when the latest probe of the current primary succeeded and
// is fresh (no older than 3 health intervals plus the probe timeout); otherwise reason
// says why, briefly and without secrets. It never touches a device.
func (s *Service) Healthz() (ok bool, reason string) {
	r := s.healthz(s.ring.Load().Primary().ID())
	return r == "ok", r
}

func (s *Service) healthz(primary string) string {
	r := s.healthReason(primary)
	if r == "ok" {
		return r
	}
	if e := s.reloadErr.Load(); e != nil {
		r += "; the latest config reload also failed (" + *e + "; details in the hwkms log)"
	}
	return r
}

func (s *Service) healthReason(primary string) string {
	h := s.health.get()
	switch {
	case h.At.IsZero():
		return "no health probe has completed yet"
	case !h.OK:
		return h.Reason
	case h.KeyID != primary:
		return "primary key_id " + primary + " has not been probed yet"
	case time.Since(h.At) > 3*s.interval+s.timeout:
		return "health probe result is stale (last at " + h.At.UTC().Format(time.RFC3339) + ")"
	}
	return "ok"
}

// Encrypt implements service.Service: it wraps a DEK seed with the primary KEK.
func (s *Service) Encrypt(ctx context.Context, uid string, plaintext []byte) (_ *service.EncryptResponse, rerr error) {
	start := time.Now()
	defer func() {
		if err := s.recovered(recover(), "Encrypt"); err != nil {
			rerr = toStatus(ctx, "encrypt", "", err)
			s.done(ctx, "Encrypt", uid, "", start, rerr, "err", err)
		}
	}()
	if n := len(plaintext); n == 0 || n > kek.MaxPlaintext {
		err := status.Errorf(codes.InvalidArgument, "encrypt: plaintext is %d bytes; hwkms accepts 1 to %d", n, kek.MaxPlaintext)
		s.done(ctx, "Encrypt", uid, "", start, err, "reason", status.Convert(err).Message())
		return nil, err
	}
	var resp *service.EncryptResponse
	var keyID string
	var backend kek.Backend
	err := s.withRing(func(r *Keyring) error {
		k := s.observed(r.Primary())
		keyID, backend = k.ID(), k.Backend()
		aad := frameAAD(k.Backend(), keyID)
		body, err := k.Wrap(ctx, plaintext, aad)
		if err != nil {
			return err
		}
		if err := verifyWrap(ctx, k, body, aad, plaintext); err != nil {
			return err
		}
		frame := encodeFrame(k.Backend(), body)
		if len(frame) > kek.MaxCiphertext {
			return fmt.Errorf("frame of %d bytes exceeds the %d-byte limit", len(frame), kek.MaxCiphertext)
		}
		resp = &service.EncryptResponse{Ciphertext: frame, KeyID: keyID}
		return nil
	})
	if err != nil {
		gerr := toStatus(ctx, "encrypt", keyID, err)
		s.done(ctx, "Encrypt", uid, keyID, start, gerr, "reason", s.deviceReason(backend, err), "err", err)
		return nil, gerr
	}
	s.done(ctx, "Encrypt", uid, keyID, start, nil)
	return resp, nil
}

// errWrapUnverified means a body the KEK just produced did not unwrap to the plaintext
// it was given. Encrypt answers Unavailable rather than hand kube-apiserver a
// ciphertext that would be lost at its next restart.
var errWrapUnverified = errors.New("a fresh wrap did not unwrap to its plaintext")

// verifyWrap unwraps body, which k.Wrap just returned for plaintext and aad, and checks
// that it gives plaintext back. Encrypt runs once per kube-apiserver start or key_id
// change, so the extra device call is cheap; without it a seed sealed to PCR values
// that already changed, or wrapped by a token that mishandles the IV or the AAD, would
// be found only when it is needed, after the next restart.
func verifyWrap(ctx context.Context, k kek.KEK, body, aad, plaintext []byte) error {
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return err
		}
		return fmt.Errorf("verify wrap: %w: %w: %w", errWrapUnverified, kek.ErrUnavailable, err)
	}
	defer clear(got)
	if subtle.ConstantTimeCompare(got, plaintext) != 1 {
		return fmt.Errorf("verify wrap: unwrapped %d bytes that differ from the %d wrapped: %w: %w", len(got), len(plaintext), errWrapUnverified, kek.ErrUnavailable)
	}
	return nil
}

// Decrypt implements service.Service: it unwraps a frame made by Encrypt, with the KEK
// named by req.KeyID.
func (s *Service) Decrypt(ctx context.Context, uid string, req *service.DecryptRequest) (_ []byte, rerr error) {
	start := time.Now()
	defer func() {
		if err := s.recovered(recover(), "Decrypt"); err != nil {
			rerr = toStatus(ctx, "decrypt", "", err)
			s.done(ctx, "Decrypt", uid, "", start, rerr, "err", err)
		}
	}()
	if err := checkDecryptRequest(req); err != nil {
		keyID := ""
		if req != nil {
			keyID = printableKeyID(req.KeyID)
		}
		s.done(ctx, "Decrypt", uid, keyID, start, err, "reason", status.Convert(err).Message())
		return nil, err
	}
	var plaintext []byte
	var backend kek.Backend
	err := s.withRing(func(r *Keyring) error {
		kk, ok := r.Lookup(req.KeyID)
		if !ok {
			return errUnknownKey
		}
		k := s.observed(kk)
		backend = k.Backend()
		b, body, err := parseFrame(req.Ciphertext)
		if err != nil {
			return err
		}
		if b != k.Backend() {
			return fmt.Errorf("frame backend %s does not match key backend %s: %w", b, k.Backend(), kek.ErrInvalidCiphertext)
		}
		plaintext, err = k.Unwrap(ctx, body, frameAAD(b, req.KeyID))
		if err != nil {
			return err
		}
		if n := len(plaintext); n == 0 || n > kek.MaxPlaintext {
			clear(plaintext)
			return fmt.Errorf("unwrapped %d bytes, outside 1..%d: %w", n, kek.MaxPlaintext, kek.ErrInvalidCiphertext)
		}
		return nil
	})
	if err != nil {
		gerr := toStatus(ctx, "decrypt", req.KeyID, err)
		s.done(ctx, "Decrypt", uid, req.KeyID, start, gerr, "reason", s.deviceReason(backend, err), "err", err)
		return nil, gerr
	}
	s.done(ctx, "Decrypt", uid, req.KeyID, start, nil)
	return plaintext, nil
}

var errUnknownKey = errors.New("key_id is not in the keyring")

func checkDecryptRequest(req *service.DecryptRequest) error {
	if req == nil {
		return status.Error(codes.InvalidArgument, "decrypt: empty request")
	}
	if err := ValidateKeyID(req.KeyID); err != nil {
		return status.Errorf(codes.InvalidArgument, "decrypt: %v", err)
	}
	if n := len(req.Ciphertext); n == 0 || n > kek.MaxCiphertext {
		return status.Errorf(codes.InvalidArgument, "decrypt: ciphertext is %d bytes; expected 1 to %d", n, kek.MaxCiphertext)
	}
	if len(req.Annotations) != 0 {
		// hwkms never returns annotations, so a request carrying some was not produced
		// by hwkms (or was altered in etcd).
		return status.Errorf(codes.InvalidArgument, "decrypt: request carries %d annotations; hwkms produces none", len(req.Annotations))
	}
	return nil
}

// toStatus maps an error from the keyring or a KEK to a gRPC status. This is the one
// place where device errors become codes (docs/contract.md). The message names the
// operation and key_id only; the device error goes to the log, never to the client.
func toStatus(ctx context.Context, op, keyID string, err error) error {
	kid := printableKeyID(keyID)
	switch {
	case errors.Is(err, errPanic):
		return status.Errorf(codes.Internal, "%s: internal error with key_id %s", op, kid)
	case errors.Is(err, errWrapUnverified):
		return status.Errorf(codes.Unavailable, "%s: the device produced a ciphertext that did not unwrap (key_id %s); nothing was returned", op, kid)
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded):
		return status.Errorf(codes.DeadlineExceeded, "%s: deadline exceeded waiting for the device (key_id %s)", op, kid)
	case errors.Is(err, context.Canceled) || errors.Is(ctx.Err(), context.Canceled):
		return status.Errorf(codes.Canceled, "%s: request canceled (key_id %s)", op, kid)
	case errors.Is(err, errUnknownKey):
		return status.Errorf(codes.NotFound, "%s: key_id %s is not in the keyring (was it removed before storage migration finished?)", op, kid)
	case errors.Is(err, kek.ErrInvalidCiphertext):
		return status.Errorf(codes.InvalidArgument, "%s: ciphertext is malformed or not authentic for key_id %s", op, kid)
	case errors.Is(err, kek.ErrInvalidInput):
		return status.Errorf(codes.InvalidArgument, "%s: invalid input for key_id %s", op, kid)
	case errors.Is(err, kek.ErrUnavailable), errors.Is(err, kek.ErrClosed):
		return status.Errorf(codes.Unavailable, "%s: device unavailable for key_id %s", op, kid)
	default:
		return status.Errorf(codes.Internal, "%s: internal error with key_id %s", op, kid)
	}
}

// printableKeyID quotes a client-supplied key_id for messages and logs, bounded in length.
func printableKeyID(id string) string {
	const max = 128
	if len(id) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(id[cut]) {
			cut--
		}
		return fmt.Sprintf("%q...", id[:cut])
	}
	return fmt.Sprintf("%q", id)
}

// done logs and observes the end of a request.
func (s *Service) done(ctx context.Context, method, uid, keyID string, start time.Time, gerr error, extra ...any) {
	d := time.Since(start)
	code := status.Code(gerr)
	if s.obs != nil {
		s.obs.ObserveRequest(method, code, d)
	}
	level, msg := slog.LevelWarn, "request failed"
	switch code {
	case codes.OK:
		level, msg = slog.LevelDebug, "request"
	case codes.Internal, codes.Unavailable, codes.DeadlineExceeded:
		level = slog.LevelError
	}
	// Building the attributes boxes every value; skip it when the line would be dropped
	// (debug is off in production, and OK requests log at debug).
	if !s.log.Enabled(ctx, level) {
		return
	}
	attrs := append([]any{"method", method, "uid", clip(uid, maxLoggedUID), "key_id", clip(keyID, kek.MaxKeyIDLen), "code", code.String(), "duration", d}, extra...)
	s.log.Log(ctx, level, msg, attrs...)
}

// maxLoggedUID bounds the client-chosen uid in a log line (kube-apiserver sends a
// 36-byte UUID): a client must not write a megabyte of log per bad request.
const maxLoggedUID = 128

// clip shortens s to at most n bytes, on a UTF-8 boundary, saying how long it was.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s...(%d bytes)", s[:cut], len(s))
}

// deviceReason names the device's reason for err with Options.DeviceReason, or "" when
// the failure did not come from a device (backend 0) or no namer is set.
func (s *Service) deviceReason(b kek.Backend, err error) string {
	if s.reason == nil || b == 0 || err == nil {
		return ""
	}
	return s.reason(b, err)
}

// observed returns k wrapped so that its Wrap and Unwrap calls are reported to the
// Observer, or k itself when there is no Observer.
func (s *Service) observed(k kek.KEK) kek.KEK {
	if s.obs == nil {
		return k
	}
	return observedKEK{KEK: k, obs: s.obs}
}

// observedKEK times Wrap and Unwrap for the Observer.
type observedKEK struct {
	kek.KEK
	obs Observer
}

func (k observedKEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	start := time.Now()
	body, err := k.KEK.Wrap(ctx, plaintext, aad)
	k.obs.ObserveDevice(k.KEK.Backend(), "wrap", time.Since(start), err)
	return body, err
}

func (k observedKEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	start := time.Now()
	pt, err := k.KEK.Unwrap(ctx, body, aad)
	k.obs.ObserveDevice(k.KEK.Backend(), "unwrap", time.Since(start), err)
	return pt, err
}
