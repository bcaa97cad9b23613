package hsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
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
)

// The in-process refusedPINs map stops reloads from presenting a refused PIN again,
// but a supervisor that restarts hwkms (kubelet restarts a static pod whatever its
// exit status) would start a new process that tries the same PIN once more, and the
// next, until the token locks. RememberRefusals extends that memory to a file, so a
// restarted process recognises the PIN the token refused and makes no C_Login
// until the PIN (file or variable) changes.
//
// The file holds, per token, HMAC-SHA-256 of the refused PIN under a random key kept
// in the same file, and the CK_RV. It is created 0600 in a directory only hwkms
// writes; anyone who can read it can read the PIN file too (the same user), so it
// adds no exposure beyond offline guessing of a PIN that was wrong anyway.

// refusalFile is the persistent form of refused PINs.
type refusalFile struct {
	Key     []byte                   `json:"key"`     // HMAC key, 32 random bytes
	Refused map[string]refusalRecord `json:"refused"` // by hex SHA-256 of the token key
}

type refusalRecord struct {
	MAC []byte    `json:"mac"` // HMAC(Key, PIN)
	RV  uint      `json:"rv"`  // CK_RV of the refusal
	At  time.Time `json:"at"`
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
	f := &refusalFile{Refused: map[string]refusalRecord{}}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f.Key = make([]byte, 32)
		if _, err := rand.Read(f.Key); err != nil {
			return fmt.Errorf("hsm: refused-PIN record: %w", err)
		}
	case err != nil:
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	default:
		if err := json.Unmarshal(data, f); err != nil || len(f.Key) != 32 {
			return fmt.Errorf("hsm: refused-PIN record %s is damaged (remove it to start afresh): %v", path, err)
		}
		if f.Refused == nil {
			f.Refused = map[string]refusalRecord{}
		}
	}
	// Nothing is written until a token refuses a PIN (persistRefusal).
	refusalStore.path, refusalStore.f = path, f
	return nil
}

// writeRefusals replaces the file atomically, creating its directory if needed.
func writeRefusals(path string, f *refusalFile) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	data, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".refused-*")
	if err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("hsm: refused-PIN record: %w", err)
	}
	return nil
}

func recordID(tokenKey string) string {
	sum := sha256.Sum256([]byte(tokenKey))
	return hex.EncodeToString(sum[:])
}

// pinMAC is the record's HMAC of pin. The caller holds refusalStore.
func (f *refusalFile) pinMAC(pin string) []byte {
	m := hmac.New(sha256.New, f.Key)
	m.Write([]byte(pin))
	return m.Sum(nil)
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
	r, found := f.Refused[recordID(tokenKey)]
	if !found || !hmac.Equal(f.pinMAC(pin), r.MAC) {
		return 0, "", false
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
		f.Refused[id] = refusalRecord{MAC: f.pinMAC(pin), RV: uint(rv), At: time.Now().UTC()}
	}
	return writeRefusals(refusalStore.path, f)
}
