package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/audit"
	"github.com/hwkms/hwkms/plugin/kek"
)

func TestStorageAuditFlagErrors(t *testing.T) {
	dir := t.TempDir()
	enc := filepath.Join(dir, "enc.yaml")
	os.WriteFile(enc, []byte("resources: [{resources: [secrets], providers: [{kms: {apiVersion: v2, name: hwkms}}]}]"), 0o600)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"storage"}, ""},
		{[]string{"storage", "audit", "--etcd-servers", "http://127.0.0.1:1"}, "--encryption-provider-config is required"},
		{[]string{"storage", "audit", "--encryption-provider-config", enc}, "--etcd-servers is required"},
		{[]string{"storage", "audit", "--encryption-provider-config", enc, "--etcd-servers", "127.0.0.1:2379"}, "--etcd-servers"},
		{[]string{"storage", "audit", "--encryption-provider-config", enc, "--etcd-servers", "http://127.0.0.1:1", "--resource", "a/b"}, "--resource"},
		{[]string{"storage", "audit", "--encryption-provider-config", filepath.Join(dir, "none"), "--etcd-servers", "http://127.0.0.1:1"}, "--encryption-provider-config"},
	} {
		var out, errb bytes.Buffer
		err := run(context.Background(), tt.args, strings.NewReader(""), &out, &errb)
		if err == nil || !strings.Contains(err.Error()+errb.String(), tt.want) {
			t.Errorf("%v: %v %q, want an error with %q", tt.args, err, errb.String(), tt.want)
		}
	}
}

func TestPrintAudit(t *testing.T) {
	r := &audit.Result{EtcdPrefix: "/registry", Revision: 9, Resources: []audit.Resource{{
		Resource: "secrets", Prefix: "/registry/secrets/", Objects: 8, Unreadable: 1, Unencrypted: 2,
		Counts: []audit.Count{
			{Kind: audit.KindIdentity, Objects: 2, Configured: true},
			{Kind: audit.KindKMSv2, Name: "hwkms", KeyID: "p11:a", Objects: 4, Configured: true},
			{Kind: audit.KindKMSv2, Name: "old", KeyID: "evil\x1b[2J", Objects: 1},
		},
	}}, Totals: audit.Totals{Objects: 8, Unencrypted: 2, Unreadable: 1, KeyIDs: map[string]int64{"p11:a": 4, "evil\x1b[2J": 1}}}
	var b bytes.Buffer
	if err := printAudit(&b, r); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, s := range []string{"secrets (/registry/secrets/): 8 objects", "p11:a", `"evil\x1b[2J"`, "not in the configuration",
		"unreadable", "TOTAL: 8 objects, 2 unencrypted", kek.APIServerKeyIDHash("p11:a")} {
		if !strings.Contains(out, s) {
			t.Errorf("output lacks %q:\n%s", s, out)
		}
	}
	if strings.Contains(out, "\x1b") {
		t.Errorf("a stored key_id reached the terminal unquoted:\n%q", out)
	}
}

func TestDestroyGuardWithoutAudit(t *testing.T) {
	fs := flag.NewFlagSet("key destroy", flag.ContinueOnError)
	guard := destroyGuard(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	if err := guard(context.Background(), "p11:x", &errb); err != nil || !strings.Contains(errb.String(), "not audited") {
		t.Errorf("no etcd flags: %v %q, want a warning", err, errb.String())
	}
	fs = flag.NewFlagSet("key destroy", flag.ContinueOnError)
	guard = destroyGuard(fs)
	fs.Parse([]string{"--destroy-with-objects=3"})
	if err := guard(context.Background(), "p11:x", &errb); err == nil || !strings.Contains(err.Error(), "--etcd-servers") {
		t.Errorf("override without an audit: %v", err)
	}
	fs = flag.NewFlagSet("key destroy", flag.ContinueOnError)
	guard = destroyGuard(fs)
	fs.Parse([]string{"--etcd-servers", "http://127.0.0.1:1"})
	if err := guard(context.Background(), "p11:x", &errb); err == nil || !strings.Contains(err.Error(), "nothing destroyed") {
		t.Errorf("audit failing: %v, want a refusal", err)
	}
}
