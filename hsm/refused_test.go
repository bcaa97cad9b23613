package hsm

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"golang.org/x/crypto/argon2"
)

// useRefusalRecord points the refused-PIN store at path for one test.
func useRefusalRecord(t *testing.T, path string) {
	t.Helper()
	if err := RememberRefusals(path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { RememberRefusals("") })
}

// TestRefusalRecordIsMemoryHard: a recorded refusal holds no HMAC key and no value a
// guess can be checked against in microseconds. Its mac is Argon2id of the PIN under
// the parameters recorded with it (recomputed here independently), and one check costs
// at least tens of milliseconds. The version 1 form (HMAC-SHA-256 under a key kept in
// the file) made one guess cost about a microsecond.
func TestRefusalRecordIsMemoryHard(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "hwkms-refused-pins.json")
	useRefusalRecord(t, path)
	const token, pin = "module|serial-1", "1234"
	if err := persistRefusal(token, pin, pkcs11.CKR_PIN_INCORRECT); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte(pin)) {
		t.Fatal("the record holds the PIN")
	}
	var raw struct {
		Version int                        `json:"version"`
		Key     []byte                     `json:"key"`
		Refused map[string]json.RawMessage `json:"refused"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatal(err)
	}
	if raw.Version != 2 || raw.Key != nil || len(raw.Refused) != 1 {
		t.Fatalf("record: version %d, key %x, %d records; want version 2, no key, 1 record:\n%s", raw.Version, raw.Key, len(raw.Refused), data)
	}
	var rec struct {
		KDF struct {
			Alg       string `json:"alg"`
			Time      uint32 `json:"time"`
			MemoryKiB uint32 `json:"memoryKiB"`
			Threads   uint8  `json:"threads"`
			Salt      []byte `json:"salt"`
		} `json:"kdf"`
		MAC []byte `json:"mac"`
		RV  uint   `json:"rv"`
	}
	if err := json.Unmarshal(raw.Refused[recordID(token)], &rec); err != nil {
		t.Fatal(err)
	}
	k := rec.KDF
	if k.Alg != "argon2id" || k.Time < 1 || k.MemoryKiB < 64*1024 || k.Threads < 1 || len(k.Salt) != 16 || rec.RV != uint(pkcs11.CKR_PIN_INCORRECT) {
		t.Fatalf("record parameters %+v rv %d; want argon2id with at least 64 MiB and a 16-byte salt", k, rec.RV)
	}
	// No HMAC-SHA-256 of the PIN under anything the file holds.
	for _, key := range [][]byte{raw.Key, k.Salt, rec.MAC, data} {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(pin))
		if hmac.Equal(m.Sum(nil), rec.MAC) {
			t.Fatal("the record's mac is an HMAC-SHA-256 of the PIN under a value in the file")
		}
	}
	if sum := sha256.Sum256([]byte(pin)); bytes.Equal(sum[:], rec.MAC) {
		t.Fatal("the record's mac is SHA-256 of the PIN")
	}
	start := time.Now()
	want := argon2.IDKey([]byte(pin), k.Salt, k.Time, k.MemoryKiB, k.Threads, 32)
	cost := time.Since(start)
	if !bytes.Equal(want, rec.MAC) {
		t.Fatal("the record's mac is not Argon2id of the PIN under its recorded parameters")
	}
	if cost < 20*time.Millisecond {
		t.Fatalf("one guess costs %v, want tens of milliseconds", cost)
	}
	t.Logf("one check of the recorded refusal costs %v", cost)

	// The record is still recognised, in this process and after a restart.
	for range 2 {
		rv, rpath, ok := persistedRefusal(token, pin)
		if !ok || rv != pkcs11.CKR_PIN_INCORRECT || rpath != path {
			t.Fatalf("persistedRefusal = %v %q %v, want the recorded refusal", rv, rpath, ok)
		}
		if _, _, ok := persistedRefusal(token, "12345"); ok {
			t.Fatal("another PIN matches the record")
		}
		useRefusalRecord(t, path)
	}
}

// v1Record is a version 1 file as an older hwkms wrote it: HMAC key 0x01..0x20, one
// record for token "module|serial-1" refusing PIN "4711" with CKR_PIN_INCORRECT (0xa0).
const v1Record = `{"key":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=","refused":{"8b0ab3abbbb088bac2a3a1da820821c8c08de609f0b8f8470efab053923d0f56":{"mac":"` + v1MAC + `","rv":160,"at":"2026-01-02T03:04:05Z"}}}`

// v1MAC is HMAC-SHA-256(0x01..0x20, "4711"), base64.
const v1MAC = "e2AscY7n3cVcvEiT7Qvp9S/nIyDLwL1oqpouilHfOGE="

// TestRefusalRecordV1StillReads: a version 1 record still counts (a restarted process
// must not present the refused PIN again), is migrated to version 2 when its PIN is
// presented, and the HMAC key leaves the file with the last version 1 record.
func TestRefusalRecordV1StillReads(t *testing.T) {
	const token, pin = "module|serial-1", "4711"
	if got := recordID(token); !strings.Contains(v1Record, got) {
		t.Fatalf("test data: record id of %q is %s", token, got)
	}
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i + 1)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(pin))
	var check struct {
		MAC []byte `json:"mac"`
	}
	if err := json.Unmarshal([]byte(`{"mac":"`+v1MAC+`"}`), &check); err != nil || !hmac.Equal(check.MAC, m.Sum(nil)) {
		t.Fatalf("test data: v1MAC is not HMAC-SHA-256(key, %q)", pin)
	}

	path := filepath.Join(t.TempDir(), "hwkms-refused-pins.json")
	if err := os.WriteFile(path, []byte(v1Record), 0o600); err != nil {
		t.Fatal(err)
	}
	useRefusalRecord(t, path)
	if _, _, ok := persistedRefusal(token, "0000"); ok {
		t.Fatal("another PIN matches the version 1 record")
	}
	if data, _ := os.ReadFile(path); string(data) != v1Record {
		t.Fatalf("a non-matching check rewrote the version 1 file:\n%s", data)
	}
	rv, rpath, ok := persistedRefusal(token, pin)
	if !ok || rv != pkcs11.CKR_PIN_INCORRECT || rpath != path {
		t.Fatalf("version 1 record: persistedRefusal = %v %q %v, want CKR_PIN_INCORRECT from %s", rv, rpath, ok, path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f refusalFile
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	r := f.Refused[recordID(token)]
	if f.Version != 2 || f.Key != nil || r.KDF == nil || r.RV != 160 || !r.At.Equal(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Fatalf("after the PIN was presented the record is not migrated to version 2 without a key:\n%s", data)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("migrated record %s: %v, want mode 0600", path, err)
	}
	// The migrated record counts after a restart.
	useRefusalRecord(t, path)
	if _, _, ok := persistedRefusal(token, pin); !ok {
		t.Fatal("the migrated record no longer matches its PIN")
	}
	// A successful login erases it.
	if err := persistRefusal(token, "", 0); err != nil {
		t.Fatal(err)
	}
	useRefusalRecord(t, path)
	if _, _, ok := persistedRefusal(token, pin); ok {
		t.Fatal("the record survived a successful login")
	}
}

// TestRefusalRecordDamaged: files whose version, key or recorded cost is out of range
// are refused at RememberRefusals, not used (a tampered cost could make a check run
// for minutes, or make the hash cheap).
func TestRefusalRecordDamaged(t *testing.T) {
	rec := func(kdf string) string {
		return `{"version":2,"refused":{"aa":{"kdf":` + kdf + `,"mac":"` + v1MAC + `","rv":160}}}`
	}
	salt := `"AAAAAAAAAAAAAAAAAAAAAA=="` // 16 bytes
	for name, body := range map[string]string{
		"not json":         "{",
		"future version":   `{"version":3,"refused":{}}`,
		"v1 without key":   `{"refused":{}}`,
		"v2 record no key": `{"version":2,"refused":{"aa":{"mac":"` + v1MAC + `","rv":160}}}`,
		"unknown kdf":      rec(`{"alg":"scrypt","time":2,"memoryKiB":65536,"threads":1,"salt":` + salt + `}`),
		"cheap memory":     rec(`{"alg":"argon2id","time":1,"memoryKiB":8,"threads":1,"salt":` + salt + `}`),
		"huge memory":      rec(`{"alg":"argon2id","time":1,"memoryKiB":4194304,"threads":1,"salt":` + salt + `}`),
		"huge time":        rec(`{"alg":"argon2id","time":100000,"memoryKiB":65536,"threads":1,"salt":` + salt + `}`),
		"no threads":       rec(`{"alg":"argon2id","time":2,"memoryKiB":65536,"threads":0,"salt":` + salt + `}`),
		"short salt":       rec(`{"alg":"argon2id","time":2,"memoryKiB":65536,"threads":1,"salt":"AAAA"}`),
		"short mac":        `{"version":2,"refused":{"aa":{"kdf":{"alg":"argon2id","time":2,"memoryKiB":65536,"threads":1,"salt":` + salt + `},"mac":"AAAA","rv":160}}}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "hwkms-refused-pins.json")
			if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			err := RememberRefusals(path)
			t.Cleanup(func() { RememberRefusals("") })
			if err == nil || !strings.Contains(err.Error(), "damaged") || !strings.Contains(err.Error(), path) {
				t.Fatalf("RememberRefusals = %v, want a damaged-record error naming %s", err, path)
			}
		})
	}
}
