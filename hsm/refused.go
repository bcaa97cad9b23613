package hsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
	"golang.org/x/crypto/argon2"

	"github.com/hwkms/hwkms/plugin/files"
)

// The in-process refusedPINs map stops reloads from presenting a refused PIN again,
// but a supervisor that restarts hwkms (kubelet restarts a static pod whatever its
// exit status) would start a new process that tries the same PIN once more, and the
// next, until the token locks. RememberRefusals extends that memory to a file, so a
// restarted process recognises the PIN the token refused and makes no C_Login
// until the PIN (file or variable) changes.
//
// The file holds, per token, a memory-hard hash of the refused PIN and the CK_RV. It
// is created 0600 in a directory only hwkms writes. Whoever can read it can usually
// read the PIN file too (the same user), but a copy of the record alone (a backup, a
// support bundle) must not give the PIN away cheaply: PINs are often short, and the
// hash and everything needed to recompute it are in the file, so the only protection
// against offline guessing is the cost of one guess.
//
// Formats (the file is JSON; every format stays readable):
//
//   - version 1 (no "version" field): "key" is a 32-byte HMAC key and each record's
//     "mac" is HMAC-SHA-256(key, PIN). One guess costs about a microsecond.
//   - version 2: "version": 2, no "key"; each record has "kdf" {"alg": "argon2id",
//     "time", "memoryKiB", "threads", "salt" (16 random bytes per record)} and "mac" =
//     Argon2id(PIN, salt, time, memoryKiB, threads, 32 bytes). New records use
//     refusalCost: one check takes about 85 ms and 64 MiB on the machine it was
//     measured on (docs/reliability.md).
//
// A version 1 file is read and its records still count: dropping them would let a
// restarted process present a refused PIN once more. A version 1 record is migrated
// when its PIN is presented again (that is the only time the PIN is known): it is
// rewritten as a version 2 record. Any write drops the HMAC key once no version 1
// record is left; a successful login erases the token's record, whatever its version.
// An hwkms that knows only version 1 reports a version 2 file as damaged.

// refusalVersion is the format version written.
const refusalVersion = 2

// refusalFile is the persistent form of refused PINs.
type refusalFile struct {
	Version int                      `json:"version,omitempty"` // absent (0) in version 1
	Key     []byte                   `json:"key,omitempty"`     // version 1 records only: HMAC key, 32 random bytes
	Refused map[string]refusalRecord `json:"refused"`           // by hex SHA-256 of the token key
}

type refusalRecord struct {
	KDF *refusalKDF `json:"kdf,omitempty"` // nil: a version 1 record, MAC = HMAC(Key, PIN)
	MAC []byte      `json:"mac"`           // Argon2id(PIN, KDF) or, version 1, HMAC(Key, PIN)
	RV  uint        `json:"rv"`            // CK_RV of the refusal
	At  time.Time   `json:"at"`
}

// refusalKDF is the Argon2id derivation of a version 2 record.
type refusalKDF struct {
	Alg       string `json:"alg"` // "argon2id"
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memoryKiB"`
	Threads   uint8  `json:"threads"`
	Salt      []byte `json:"salt"`
}

// refusalCost is the Argon2id cost of new records: time 2, 64 MiB, one thread.
// Measured with golang.org/x/crypto/argon2 on the 2-core build machine: 85 ms per
// check (time 1: 47 ms; time 3: 130 ms). A check runs only when a token has a
// refusal recorded, before the C_Login it replaces.
var refusalCost = refusalKDF{Alg: "argon2id", Time: 2, MemoryKiB: 64 * 1024, Threads: 1}

// Bounds on a record's recorded cost: a tampered file must not make a check run for
// minutes or allocate gigabytes, nor make the hash cheap.
const (
	maxRefusalTime      = 16
	maxRefusalMemoryKiB = 1 << 20 // 1 GiB
	minRefusalMemoryKiB = 8 * 1024
	maxRefusalThreads   = 16
	refusalSaltLen      = 16
	refusalMACLen       = 32
)

// check validates a recorded derivation.
func (k *refusalKDF) check() error {
	switch {
	case k.Alg != "argon2id":
		return fmt.Errorf("unknown kdf %q", k.Alg)
	case k.Time < 1 || k.Time > maxRefusalTime:
		return fmt.Errorf("argon2id time %d out of range 1-%d", k.Time, maxRefusalTime)
	case k.MemoryKiB < minRefusalMemoryKiB || k.MemoryKiB > maxRefusalMemoryKiB:
		return fmt.Errorf("argon2id memory %d KiB out of range %d-%d", k.MemoryKiB, minRefusalMemoryKiB, maxRefusalMemoryKiB)
	case k.Threads < 1 || k.Threads > maxRefusalThreads:
		return fmt.Errorf("argon2id threads %d out of range 1-%d", k.Threads, maxRefusalThreads)
	case len(k.Salt) != refusalSaltLen:
		return fmt.Errorf("argon2id salt of %d bytes, want %d", len(k.Salt), refusalSaltLen)
	}
	return nil
}

// derive is the record's hash of pin.
func (k *refusalKDF) derive(pin string) []byte {
	return argon2.IDKey([]byte(pin), k.Salt, k.Time, k.MemoryKiB, k.Threads, refusalMACLen)
}

// refusalStore is the file RememberRefusals set, if any.
var refusalStore struct {
	sync.Mutex
	path string
	f    *refusalFile
}

// RememberRefusals makes refused PINs survive restarts: they are recorded in the file
// at path (created 0600, with its directory, at the first refusal) and checked before every
// C_Login, as refusedPINs is within a process. A PIN recorded as refused gets a
// *PINError marked Repeated without a C_Login; a successful login erases the token's
// record. Call it once, before the first Open; "" turns it off.
func RememberRefusals(path string) error {
	refusalStore.Lock()
	defer refusalStore.Unlock()
	if path == "" {
		refusalStore.path, refusalStore.f = "", nil
		return nil
	}
	f := &refusalFile{Version: refusalVersion, Refused: map[string]refusalRecord{}}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	default:
		if f, err = parseRefusals(data); err != nil {
			return fmt.Errorf("hsm: refused-PIN record %s is damaged (remove it to start afresh): %v", path, err)
		}
	}
	// Nothing is written until a token refuses a PIN (persistRefusal).
	refusalStore.path, refusalStore.f = path, f
	return nil
}

// parseRefusals reads a file of any known version.
func parseRefusals(data []byte) (*refusalFile, error) {
	f := &refusalFile{}
	if err := json.Unmarshal(data, f); err != nil {
		return nil, err
	}
	if f.Version != 0 && f.Version != refusalVersion {
		return nil, fmt.Errorf("unknown version %d", f.Version)
	}
	if f.Version == 0 && len(f.Key) != 32 {
		return nil, fmt.Errorf("version 1 HMAC key of %d bytes, want 32", len(f.Key))
	}
	if f.Refused == nil {
		f.Refused = map[string]refusalRecord{}
	}
	for id, r := range f.Refused {
		switch {
		case r.KDF == nil && len(f.Key) != 32:
			return nil, fmt.Errorf("record %.12s: version 1 record without the file's HMAC key", id)
		case r.KDF != nil:
			if err := r.KDF.check(); err != nil {
				return nil, fmt.Errorf("record %.12s: %w", id, err)
			}
		}
		if len(r.MAC) != refusalMACLen {
			return nil, fmt.Errorf("record %.12s: mac of %d bytes, want %d", id, len(r.MAC), refusalMACLen)
		}
	}
	// Written back (at the next change) as the current version.
	f.Version = refusalVersion
	return f, nil
}

// writeRefusals replaces the file durably (files.WriteFile), creating its directory
// if needed. The version 1 HMAC key is kept only while a version 1 record is left.
func writeRefusals(path string, f *refusalFile) error {
	legacy := false
	for _, r := range f.Refused {
		legacy = legacy || r.KDF == nil
	}
	if !legacy {
		f.Key = nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	data, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	if err := files.WriteFile(path, data, files.WriteOptions{Mode: 0o600}); err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	return nil
}

func recordID(tokenKey string) string {
	sum := sha256.Sum256([]byte(tokenKey))
	return hex.EncodeToString(sum[:])
}

// newRecord derives a version 2 record of pin with a fresh salt.
func newRecord(pin string, rv uint, at time.Time) (refusalRecord, error) {
	kdf := refusalCost
	kdf.Salt = make([]byte, refusalSaltLen)
	if _, err := rand.Read(kdf.Salt); err != nil {
		return refusalRecord{}, fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	return refusalRecord{KDF: &kdf, MAC: kdf.derive(pin), RV: rv, At: at}, nil
}

// matches reports whether r records pin. The caller holds refusalStore.
func (f *refusalFile) matches(r refusalRecord, pin string) bool {
	if r.KDF != nil {
		return subtle.ConstantTimeCompare(r.KDF.derive(pin), r.MAC) == 1
	}
	m := hmac.New(sha256.New, f.Key)
	m.Write([]byte(pin))
	return hmac.Equal(m.Sum(nil), r.MAC)
}

// persistedRefusal returns the CK_RV recorded for tokenKey, and the record's path, if
// pin is the PIN the token refused in an earlier process.
func persistedRefusal(tokenKey, pin string) (rv pkcs11.Error, path string, ok bool) {
	refusalStore.Lock()
	defer refusalStore.Unlock()
	f := refusalStore.f
	if f == nil {
		return 0, "", false
	}
	id := recordID(tokenKey)
	r, found := f.Refused[id]
	if !found || !f.matches(r, pin) {
		return 0, "", false
	}
	if r.KDF == nil {
		// Migrate the version 1 record now that its PIN is known. If the write fails
		// the version 1 record stays, and still counts.
		if nr, err := newRecord(pin, r.RV, r.At); err == nil {
			f.Refused[id] = nr
			if err := writeRefusals(refusalStore.path, f); err != nil {
				f.Refused[id] = r
			}
		}
	}
	return pkcs11.Error(r.RV), refusalStore.path, true
}

// persistRefusal records (rv != 0) or erases (rv == 0) tokenKey's refused PIN. It
// returns an error only when the file could not be written.
func persistRefusal(tokenKey, pin string, rv pkcs11.Error) error {
	refusalStore.Lock()
	defer refusalStore.Unlock()
	f := refusalStore.f
	if f == nil {
		return nil
	}
	id := recordID(tokenKey)
	if rv == 0 {
		if _, ok := f.Refused[id]; !ok {
			return nil
		}
		delete(f.Refused, id)
	} else {
		r, err := newRecord(pin, uint(rv), time.Now().UTC())
		if err != nil {
			return err
		}
		f.Refused[id] = r
	}
	return writeRefusals(refusalStore.path, f)
}
