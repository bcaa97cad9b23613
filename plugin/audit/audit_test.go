package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
)

// memRanger is an in-memory etcd keyspace that records every Range.
type memRanger struct {
	keys    []string
	vals    map[string][]byte
	rev     int64
	calls   []rangeCall
	tooBig  int64 // answer ErrTooLarge when asked for more keys than this (0: never)
	failAt  int   // fail the n-th call (1-based; 0: never)
	pageMax int64
}

type rangeCall struct {
	key, end   string
	limit, rev int64
}

func newMem(kv map[string][]byte) *memRanger {
	m := &memRanger{vals: kv, rev: 42}
	for k := range kv {
		m.keys = append(m.keys, k)
	}
	sort.Strings(m.keys)
	return m
}

func (m *memRanger) Range(ctx context.Context, key, end []byte, limit, rev int64) (Page, error) {
	m.calls = append(m.calls, rangeCall{string(key), string(end), limit, rev})
	if m.failAt > 0 && len(m.calls) == m.failAt {
		return Page{}, errors.New("connection refused")
	}
	if m.tooBig > 0 && limit > m.tooBig {
		return Page{}, ErrTooLarge
	}
	m.pageMax = max(m.pageMax, limit)
	p := Page{Revision: m.rev}
	i := sort.SearchStrings(m.keys, string(key))
	for ; i < len(m.keys) && m.keys[i] < string(end); i++ {
		if int64(len(p.KVs)) == limit {
			p.More = true
			break
		}
		p.KVs = append(p.KVs, KV{Key: []byte(m.keys[i]), Value: m.vals[m.keys[i]]})
	}
	return p, nil
}

func testCfg(t *testing.T) *Config {
	t.Helper()
	c, err := ParseConfig([]byte(testConfig))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRunCountsAndPages(t *testing.T) {
	kv := map[string][]byte{}
	batch := 0
	add := func(prefix string, n int, v func(i int) []byte) {
		batch++
		for i := range n {
			kv[fmt.Sprintf("/registry/%s/ns-%d/obj-%05d", prefix, batch, i)] = v(i)
		}
	}
	add("secrets", 3000, func(i int) []byte { return kmsv2("hwkms", good(fmt.Sprintf("key-%d", i%2))) })
	add("secrets", 40, func(int) []byte { return []byte("k8s:enc:aescbc:v1:k1:xxxxxxxx") })
	add("secrets", 5, func(int) []byte { return []byte("k8s:enc:aescbc:v1:gone:xxxx") }) // key no longer configured
	add("secrets", 7, func(int) []byte { return []byte("\x00garbage") })
	add("secrets", 11, func(int) []byte { return []byte(`{"kind":"Secret"}`) })
	add("deployments", 20, func(int) []byte { return []byte("k8s:enc:aesgcm:v1:g1:xx") })
	add("configmaps", 9, func(int) []byte { return []byte("k8s\x00proto") }) // "*." rule: secretbox, so identity is "other"
	add("example.com/widgets", 6, func(int) []byte { return kmsv2("hwkms", good("key-1")) })
	add("pods", 100, func(int) []byte { return []byte("{}") }) // "*.": counted as core
	add("jobs", 13, func(int) []byte { return []byte("{}") })  // batch is not configured: never read
	m := newMem(kv)
	var progress []int64
	r, err := Run(context.Background(), m, testCfg(t), Options{PageBytes: 4096, MaxPageKeys: 50,
		Progress: func(n int64, _ string) { progress = append(progress, n) }})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, res := range r.Resources {
		got[res.Resource] = fmt.Sprintf("%d obj %d unenc %d other %d unreadable %v", res.Objects, res.Unencrypted, res.OtherProviders, res.Unreadable, res.Counts)
	}
	if r.Totals.KeyIDs["key-0"] != 1500 || r.Totals.KeyIDs["key-1"] != 1506 {
		t.Errorf("key_ids: %v", r.Totals.KeyIDs)
	}
	sec := find(t, r, "secrets")
	if sec.Objects != 3063 || sec.Unreadable != 7 || sec.OtherProviders != 5 || sec.Unencrypted != 11 {
		t.Errorf("secrets: %s", got["secrets"])
	}
	if cm := find(t, r, "configmaps"); cm.Objects != 9 || cm.OtherProviders != 9 || cm.Unencrypted != 9 {
		t.Errorf("configmaps: %s", got["configmaps"])
	}
	if d := find(t, r, "deployments.apps"); d.Objects != 20 || d.OtherProviders != 0 {
		t.Errorf("deployments.apps: %s", got["deployments.apps"])
	}
	if p := find(t, r, "pods"); p.Objects != 100 {
		t.Errorf("pods: %s", got["pods"])
	}
	if _, ok := got["jobs.batch"]; ok || r.Totals.Objects != 3063+9+20+6+100 {
		t.Errorf("resources: %v (total %d)", got, r.Totals.Objects)
	}
	// Paging: every call after the first reads at the first answer's revision, asks for
	// at most MaxPageKeys, and continues right after the last key.
	for i, c := range m.calls {
		if c.limit < 1 || c.limit > 50 {
			t.Errorf("call %d: limit %d", i, c.limit)
		}
		if c.rev != 0 && c.rev != 42 {
			t.Errorf("call %d: revision %d", i, c.rev)
		}
		if i > 0 && c.rev != 42 {
			t.Errorf("call %d did not pin the revision", i)
		}
		if i > 0 && m.calls[i-1].end == c.end && !strings.HasSuffix(c.key, "\x00") {
			t.Errorf("call %d continues at %q, not after the previous page's last key", i, c.key)
		}
	}
	if len(m.calls) < 3000/50 {
		t.Errorf("%d Range calls for 3,000+ keys with pages of at most 50", len(m.calls))
	}
	if len(progress) == 0 || progress[len(progress)-1] != r.Totals.Objects {
		t.Errorf("progress %v", progress[max(0, len(progress)-3):])
	}
	if r.Revision != 42 {
		t.Errorf("revision %d", r.Revision)
	}
}

func find(t *testing.T, r *Result, name string) Resource {
	t.Helper()
	for _, res := range r.Resources {
		if res.Resource == name {
			return res
		}
	}
	t.Fatalf("no resource %s in %+v", name, r.Resources)
	return Resource{}
}

func TestRunShrinksPagesThatAreTooLarge(t *testing.T) {
	kv := map[string][]byte{}
	for i := range 200 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%03d", i)] = kmsv2("hwkms", good("k"))
	}
	m := newMem(kv)
	m.tooBig = 7
	r, err := Run(context.Background(), m, testCfg(t), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Totals.KeyIDs["k"] != 200 || m.pageMax > 7 {
		t.Errorf("counted %d, largest page asked %d", r.Totals.KeyIDs["k"], m.pageMax)
	}
}

func TestRunErrors(t *testing.T) {
	m := newMem(map[string][]byte{"/registry/secrets/a": []byte("{}")})
	if _, err := Run(context.Background(), m, testCfg(t), Options{Only: []GroupResource{{"batch", "jobs"}}}); err == nil || !strings.Contains(err.Error(), "--resource jobs.batch") {
		t.Errorf("uncovered --resource: %v", err)
	}
	for _, p := range []string{"registry", "/registry/", "//registry"} {
		r, err := Run(context.Background(), m, testCfg(t), Options{Prefix: p})
		if err != nil || r.Totals.Objects != 1 || r.EtcdPrefix != "/registry" {
			t.Errorf("--etcd-prefix %q: %v %+v, want the keys under /registry", p, err, r)
		}
	}
	m = newMem(map[string][]byte{"/registry/secrets/a": []byte("{}")})
	m.failAt = 1
	if _, err := Run(context.Background(), m, testCfg(t), Options{}); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("failing etcd: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Run(ctx, newMem(nil), testCfg(t), Options{}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled: %v", err)
	}
}

func TestRunCapsDistinctKeyIDs(t *testing.T) {
	kv := map[string][]byte{}
	for i := range 100 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%03d", i)] = kmsv2("hwkms", good(fmt.Sprintf("k%03d", i)))
	}
	r, err := Run(context.Background(), newMem(kv), testCfg(t), Options{MaxKeyIDs: 10})
	if err != nil {
		t.Fatal(err)
	}
	if r.Totals.Untracked != 90 || len(r.Totals.KeyIDs) != 10 {
		t.Fatalf("untracked %d, key_ids %d", r.Totals.Untracked, len(r.Totals.KeyIDs))
	}
	// A key_id the audit did not keep might be the one: the guard refuses.
	if err := CheckDestroy(r, "k099", -1); !errors.Is(err, ErrObjectsStored) || !strings.Contains(err.Error(), "90 untracked") {
		t.Errorf("CheckDestroy with untracked objects: %v", err)
	}
}

func TestCheckDestroy(t *testing.T) {
	r := &Result{Revision: 7, Totals: Totals{KeyIDs: map[string]int64{"old": 25, "new": 40}}}
	for _, tt := range []struct {
		keyID    string
		override int64
		ok       bool
		msg      string
	}{
		{"old", -1, false, "25 object(s) stored under key_id old"},
		{"old", 24, false, "does not match"},
		{"old", 26, false, "does not match"},
		{"old", 25, true, ""},
		{"gone", -1, true, ""},
		{"gone", 3, false, "found no object"},
		{"", -1, false, "empty key_id"},
	} {
		err := CheckDestroy(r, tt.keyID, tt.override)
		if (err == nil) != tt.ok || (err != nil && !strings.Contains(err.Error(), tt.msg)) {
			t.Errorf("CheckDestroy(%q, %d) = %v, want ok=%v %q", tt.keyID, tt.override, err, tt.ok, tt.msg)
		}
	}
	r.Totals.Unreadable = 2
	if err := CheckDestroy(r, "gone", -1); err == nil || !strings.Contains(err.Error(), "--destroy-with-objects=2") {
		t.Errorf("unreadable objects: %v", err)
	}
	if err := CheckDestroy(r, "old", 27); err != nil {
		t.Errorf("override naming 25 + 2 unreadable: %v", err)
	}
	if err := CheckDestroy(nil, "old", -1); err == nil {
		t.Error("nil result accepted")
	}
}

// TestRunNeverKeepsValues: the result holds no byte of any value.
func TestRunNeverKeepsValues(t *testing.T) {
	secret := []byte("SUPERSECRETPAYLOAD")
	kv := map[string][]byte{
		"/registry/secrets/a": append([]byte(`{"data":"`), secret...),
		"/registry/secrets/b": append([]byte("k8s:enc:aescbc:v1:k1:"), secret...),
		"/registry/secrets/c": append([]byte("garbage"), secret...),
		"/registry/secrets/d": append([]byte("k8s:enc:kms:v2:hwkms:"), secret...),
	}
	r, err := Run(context.Background(), newMem(kv), testCfg(t), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s := fmt.Sprintf("%+v", r); bytes.Contains([]byte(s), secret) {
		t.Errorf("result holds a value: %s", s)
	}
}
