package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/audit"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// fakeKubectl is a kubectl stand-in: a shell script that answers from files in dir and
// records every call (calls), every manifest given to create (created) and everything
// piped into replace (replaced).
type fakeKubectl struct {
	t    *testing.T
	dir  string
	path string
}

const fakeKubectlScript = `#!/bin/sh
d='%DIR%'
echo "$*" >> "$d/calls"
if [ "$1" = "--kubeconfig" ]; then shift 2; fi
case "$1" in
api-versions) cat "$d/api-versions" ;;
api-resources) cat "$d/api-resources" ;;
create) cat >> "$d/created"; echo >> "$d/created"; echo "storageversionmigration.storagemigration.k8s.io/x created" ;;
get)
  if [ "$2" = "storageversionmigrations.storagemigration.k8s.io" ]; then
    n=$(cat "$d/polls" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$d/polls"
    line=$(sed -n "${n}p" "$d/svm-states")
    [ -n "$line" ] || line=$(tail -n 1 "$d/svm-states")
    echo "$line"
  else
    echo "$2" >> "$d/got"
    cat "$d/get-json"
  fi ;;
replace)
  cat >> "$d/replaced"
  [ -f "$d/replace-out" ] && cat "$d/replace-out"
  [ -f "$d/replace-err" ] && cat "$d/replace-err" >&2
  exit $(cat "$d/replace-rc" 2>/dev/null || echo 0) ;;
*) echo "fake kubectl: unexpected $*" >&2; exit 3 ;;
esac
`

func newFakeKubectl(t *testing.T, files map[string]string) *fakeKubectl {
	t.Helper()
	dir := t.TempDir()
	f := &fakeKubectl{t: t, dir: dir, path: filepath.Join(dir, "kubectl")}
	if err := os.WriteFile(f.path, []byte(strings.ReplaceAll(fakeKubectlScript, "%DIR%", dir)), 0o700); err != nil {
		t.Fatal(err)
	}
	for name, body := range files {
		f.write(name, body)
	}
	return f
}

func (f *fakeKubectl) write(name, body string) {
	f.t.Helper()
	if err := os.WriteFile(filepath.Join(f.dir, name), []byte(body), 0o600); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeKubectl) read(name string) string {
	b, _ := os.ReadFile(filepath.Join(f.dir, name))
	return string(b)
}

const (
	svmServed    = "apps/v1\nstoragemigration.k8s.io/v1\nv1\n"
	svmNotServed = "apps/v1\nstoragemigration.k8s.io/v1beta1\nv1\n"
	svmRunning   = `{"status":{"resourceVersion":"42","conditions":[{"type":"Running","status":"True","reason":"StorageVersionMigrationInProgress"}]}}`
	svmSucceeded = `{"status":{"resourceVersion":"42","conditions":[{"type":"Running","status":"False"},{"type":"Succeeded","status":"True","reason":"StorageVersionMigrationSucceeded"}]}}`
	svmFailed    = `{"status":{"resourceVersion":"42","conditions":[{"type":"Failed","status":"True","reason":"StorageVersionMigrationFailed","message":"unable to obtain GVR from discovery"}]}}`
	svmUnpicked  = `{"status":{}}`
	// secretList stands for what kubectl get -o json prints: Secret data that must
	// reach kubectl replace and nothing else.
	secretMarker = "c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw=="
	secretList   = `{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Secret","metadata":{"name":"a","namespace":"default"},"data":{"v":"` + secretMarker + `"}},{"apiVersion":"v1","kind":"Secret","metadata":{"name":"b","namespace":"default"},"data":{"v":"` + secretMarker + `"}}]}`
)

// writeEncryptionConfig writes an EncryptionConfiguration listing resources.
func writeEncryptionConfig(t *testing.T, resources ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "enc.yaml")
	cfg := "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [" + strings.Join(resources, ", ") +
		"]\n  providers:\n  - kms: {apiVersion: v2, name: hwkms, endpoint: unix:///run/kms.sock}\n  - identity: {}\n"
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func runMigrateCmd(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = run(ctx, append([]string{"storage", "migrate"}, args...), strings.NewReader(""), &out, &errb)
	return out.String(), errb.String(), err
}

// createdSVMs decodes the manifests kubectl create received.
func createdSVMs(t *testing.T, f *fakeKubectl) []svmManifest {
	t.Helper()
	var out []svmManifest
	for _, l := range strings.Split(strings.TrimSpace(f.read("created")), "\n") {
		if l == "" {
			continue
		}
		var m svmManifest
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("kubectl create received %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// TestStorageMigrateSVM: where the API server serves storagemigration.k8s.io/v1, one
// StorageVersionMigration per configured resource is created (unique name, the
// resource's group and name) and waited for until Succeeded; nothing is replaced, and
// --kubeconfig reaches every kubectl call.
func TestStorageMigrateSVM(t *testing.T) {
	f := newFakeKubectl(t, map[string]string{"api-versions": svmServed, "svm-states": svmRunning + "\n" + svmRunning + "\n" + svmSucceeded + "\n"})
	enc := writeEncryptionConfig(t, "secrets", "deployments.apps")
	kubeconfig := filepath.Join(t.TempDir(), "admin.conf")
	out, errOut, err := runMigrateCmd(t, "--encryption-provider-config", enc, "--kubectl", f.path, "--kubeconfig", kubeconfig, "--poll-interval", "10ms")
	if err != nil {
		t.Fatalf("storage migrate: %v\n%s", err, errOut)
	}
	svms := createdSVMs(t, f)
	if len(svms) != 2 {
		t.Fatalf("created %d StorageVersionMigrations, want 2 (deployments.apps, secrets):\n%s", len(svms), f.read("created"))
	}
	want := []audit.GroupResource{{Group: "apps", Resource: "deployments"}, {Resource: "secrets"}}
	name := regexp.MustCompile(`^hwkms-[a-z0-9.-]+-\d{8}-\d{6}-[0-9a-f]{4}$`)
	for i, m := range svms {
		if m.APIVersion != svmAPIVersion || m.Kind != "StorageVersionMigration" {
			t.Errorf("manifest %d is %s %s", i, m.APIVersion, m.Kind)
		}
		if got := (audit.GroupResource{Group: m.Spec.Resource.Group, Resource: m.Spec.Resource.Resource}); got != want[i] {
			t.Errorf("manifest %d migrates %v, want %v", i, got, want[i])
		}
		if !name.MatchString(m.Metadata.Name) || !strings.Contains(m.Metadata.Name, want[i].Resource) {
			t.Errorf("manifest %d name %q: want hwkms-<resource>-<UTC time>-<random>", i, m.Metadata.Name)
		}
		if !strings.Contains(out, want[i].String()+": StorageVersionMigration "+m.Metadata.Name+" succeeded") {
			t.Errorf("stdout does not report %s succeeded:\n%s", m.Metadata.Name, out)
		}
	}
	if polls := strings.TrimSpace(f.read("polls")); polls != "4" {
		t.Errorf("read the migrations' conditions %s times, want 4 (Running, Running, Succeeded; then Succeeded)", polls)
	}
	calls := strings.Split(strings.TrimSpace(f.read("calls")), "\n")
	for _, c := range calls {
		if !strings.HasPrefix(c, "--kubeconfig "+kubeconfig+" ") {
			t.Errorf("kubectl call without --kubeconfig: %q", c)
		}
		if strings.Contains(c, "replace") {
			t.Errorf("kubectl replace ran although the API server serves StorageVersionMigrations: %q", c)
		}
	}
	if !strings.Contains(errOut, "not audited") {
		t.Errorf("without --etcd-servers migrate does not warn that nothing was audited:\n%s", errOut)
	}

	// A second run names its migrations differently (a name exists once per cluster).
	first := svms[1].Metadata.Name
	os.Remove(filepath.Join(f.dir, "created"))
	if _, errOut, err := runMigrateCmd(t, "--encryption-provider-config", enc, "--kubectl", f.path, "--resource", "secrets", "--poll-interval", "10ms"); err != nil {
		t.Fatalf("second storage migrate: %v\n%s", err, errOut)
	}
	if again := createdSVMs(t, f); len(again) != 1 || again[0].Metadata.Name == first {
		t.Errorf("second run created %v, want one StorageVersionMigration for secrets named other than %s", again, first)
	}
}

// TestStorageMigrateReplace: without storagemigration.k8s.io/v1 (or with --method
// replace), every object is rewritten through kubectl get -o json | kubectl replace:
// the JSON reaches replace intact and hwkms prints none of it, only counts.
// A Conflict (someone wrote the object meanwhile) is not an error.
func TestStorageMigrateReplace(t *testing.T) {
	for _, tt := range []struct {
		name, apiVersions string
		args              []string
	}{
		{"not served", svmNotServed, nil},
		{"forced", svmServed, []string{"--method", "replace"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeKubectl(t, map[string]string{
				"api-versions": tt.apiVersions, "get-json": secretList,
				"replace-out": "secret/a replaced\nsecret/b replaced\n",
				"replace-err": `Error from server (Conflict): error when replacing "STDIN": Operation cannot be fulfilled on secrets "c": the object has been modified; please apply your changes to the latest version and try again` + "\n" +
					"Warning: this API is deprecated\n",
				"replace-rc": "1",
			})
			enc := writeEncryptionConfig(t, "secrets")
			out, errOut, err := runMigrateCmd(t, append([]string{"--encryption-provider-config", enc, "--kubectl", f.path}, tt.args...)...)
			if err != nil {
				t.Fatalf("storage migrate: %v\n%s", err, errOut)
			}
			if got := f.read("replaced"); got != secretList {
				t.Errorf("kubectl replace received %q, want kubectl get's output unchanged", got)
			}
			if got := strings.TrimSpace(f.read("got")); got != "secrets" {
				t.Errorf("kubectl get listed %q, want secrets", got)
			}
			if !strings.Contains(out, "secrets: kubectl replace rewrote 2 object(s), 1 written meanwhile") {
				t.Errorf("stdout does not count 2 replaced and 1 conflict:\n%s", out)
			}
			if strings.Contains(out+errOut, secretMarker) || strings.Contains(out+errOut, `"data"`) {
				t.Errorf("object contents reached hwkms's output:\n%s\n%s", out, errOut)
			}
			if f.read("created") != "" {
				t.Errorf("a StorageVersionMigration was created: %s", f.read("created"))
			}
			if !strings.Contains(errOut, "secrets: kubectl replace: Warning: this API is deprecated") {
				t.Errorf("kube-apiserver's warning did not reach stderr:\n%s", errOut)
			}
			if tt.apiVersions == svmNotServed && !strings.Contains(errOut, "does not serve storagemigration.k8s.io/v1") {
				t.Errorf("the fallback to kubectl replace is not explained:\n%s", errOut)
			}
		})
	}
}

// TestStorageMigrateErrors: each failure is a clear error, not a hang or a success.
func TestStorageMigrateErrors(t *testing.T) {
	enc := writeEncryptionConfig(t, "secrets")
	for _, tt := range []struct {
		name  string
		files map[string]string
		args  []string
		want  []string
	}{
		{"svm failed", map[string]string{"api-versions": svmServed, "svm-states": svmRunning + "\n" + svmFailed + "\n"}, nil,
			[]string{"secrets: StorageVersionMigration hwkms-secrets-", "failed: StorageVersionMigrationFailed: unable to obtain GVR from discovery", "--method replace"}},
		{"svm never picked up", map[string]string{"api-versions": svmServed, "svm-states": svmUnpicked + "\n"}, []string{"--timeout", "50ms"},
			[]string{"did not succeed within 50ms", "storage-version-migrator-controller", "garbage-collector-controller"}},
		{"svm forced but not served", map[string]string{"api-versions": svmNotServed}, []string{"--method", "svm"},
			[]string{"does not serve storagemigration.k8s.io/v1", "--method replace"}},
		{"replace refused", map[string]string{"api-versions": svmNotServed, "get-json": secretList, "replace-out": "secret/a replaced\n",
			"replace-err": `Error from server (Forbidden): error when replacing "STDIN": secrets "b" is forbidden: User "x" cannot update resource "secrets"` + "\n", "replace-rc": "1"},
			nil, []string{"secrets: kubectl replace -f - (1 replaced)", "Forbidden"}},
		{"get fails", map[string]string{"api-versions": svmNotServed}, nil, []string{"kubectl get secrets --all-namespaces -o json"}},
		{"bad method", nil, []string{"--method", "patch"}, []string{`--method "patch"`}},
		{"etcd without key", nil, []string{"--etcd-servers", "http://127.0.0.1:1"}, []string{"--key-id", "--socket"}},
		{"resource not configured", nil, []string{"--resource", "configmaps"}, []string{"--resource configmaps", "does not list it"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeKubectl(t, tt.files)
			_, errOut, err := runMigrateCmd(t, append([]string{"--encryption-provider-config", enc, "--kubectl", f.path, "--poll-interval", "10ms"}, tt.args...)...)
			if err == nil {
				t.Fatalf("storage migrate succeeded, want an error with %q\n%s", tt.want, errOut)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error()+errOut, secretMarker) {
				t.Errorf("object contents in the error: %v", err)
			}
		})
	}
}

// TestStorageMigrateKubectlMissing: no kubectl is a clear error naming --kubectl, before
// anything runs.
func TestStorageMigrateKubectlMissing(t *testing.T) {
	enc := writeEncryptionConfig(t, "secrets")
	for _, bin := range []string{filepath.Join(t.TempDir(), "kubectl"), "hwkms-no-such-kubectl"} {
		_, _, err := runMigrateCmd(t, "--encryption-provider-config", enc, "--kubectl", bin)
		if err == nil || !strings.Contains(err.Error(), "kubectl") || !strings.Contains(err.Error(), "--kubectl PATH") {
			t.Errorf("--kubectl %s: %v, want an error saying kubectl is missing and naming --kubectl", bin, err)
		}
	}
}

// TestStorageMigrateWildcards: "*.apps" and "*." expand to the served resources of the
// group that can be listed and updated (kubectl api-resources --verbs=list,update).
func TestStorageMigrateWildcards(t *testing.T) {
	f := newFakeKubectl(t, map[string]string{
		"api-versions":  svmServed,
		"api-resources": "configmaps\nsecrets\ndeployments.apps\nstatefulsets.apps\njobs.batch\n",
		"svm-states":    svmSucceeded + "\n",
	})
	enc := writeEncryptionConfig(t, `"*.apps"`, `"*."`)
	if _, errOut, err := runMigrateCmd(t, "--encryption-provider-config", enc, "--kubectl", f.path, "--poll-interval", "10ms"); err != nil {
		t.Fatalf("storage migrate: %v\n%s", err, errOut)
	}
	var got []string
	for _, m := range createdSVMs(t, f) {
		got = append(got, audit.GroupResource{Group: m.Spec.Resource.Group, Resource: m.Spec.Resource.Resource}.String())
	}
	if want := "configmaps deployments.apps secrets statefulsets.apps"; strings.Join(got, " ") != want {
		t.Errorf("migrated %v, want %s", got, want)
	}
	if !strings.Contains(f.read("calls"), "api-resources --verbs=list,update -o name") {
		t.Errorf("wildcards expanded without kubectl api-resources:\n%s", f.read("calls"))
	}
}

// TestStorageMigrateAudit: after migrating, the audit decides: objects left under a
// key_id other than the primary are reported by resource and key_id; with --retries the
// resources holding them migrate again after the interval; once none is left the run
// succeeds, and without retries left it fails with errMigrationIncomplete saying to
// wait for the apiservers and re-run.
func TestStorageMigrateAudit(t *testing.T) {
	const primary, old = "p11:new", "p11:old"
	result := func(oldSecrets, oldConfigmaps int64) *audit.Result {
		r := &audit.Result{EtcdPrefix: "/registry", Revision: 7, Totals: audit.Totals{KeyIDs: map[string]int64{}}}
		for _, x := range []struct {
			res string
			n   int64
		}{{"configmaps", oldConfigmaps}, {"secrets", oldSecrets}} {
			r.Totals.KeyIDs[primary] += 5
			res := audit.Resource{Resource: x.res, Counts: []audit.Count{{Kind: audit.KindKMSv2, Name: "hwkms", KeyID: primary, Objects: 5, Configured: true}}}
			if x.n > 0 {
				res.Counts = append(res.Counts, audit.Count{Kind: audit.KindKMSv2, Name: "hwkms", KeyID: old, Objects: x.n, Configured: true})
				r.Totals.KeyIDs[old] += x.n
			}
			r.Resources = append(r.Resources, res)
		}
		return r
	}
	cfg, err := audit.ParseConfig([]byte("resources: [{resources: [secrets, configmaps], providers: [{kms: {apiVersion: v2, name: hwkms}}]}]"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name     string
		retries  int
		audits   []*audit.Result
		wantErr  bool
		wantSVMs []string // resources of the migrations created, in order
		wantOut  []string
	}{
		{"clean", 0, []*audit.Result{result(0, 0)}, false, []string{"configmaps", "secrets"},
			[]string{"10 object(s) under the primary key_id p11:new", "no object is stored under any other KMS v2 key_id"}},
		{"left, no retry", 0, []*audit.Result{result(3, 0)}, true, []string{"configmaps", "secrets"},
			[]string{"secrets: 3 object(s) still under key_id p11:old"}},
		{"left, then clean on retry", 2, []*audit.Result{result(3, 0), result(0, 0)}, false, []string{"configmaps", "secrets", "secrets"},
			[]string{"secrets: 3 object(s) still under key_id p11:old", "no object is stored under any other KMS v2 key_id"}},
		{"left after every retry", 1, []*audit.Result{result(2, 1), result(2, 1)}, true, []string{"configmaps", "secrets", "configmaps", "secrets"},
			[]string{"configmaps: 1 object(s) still under key_id p11:old"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeKubectl(t, map[string]string{"api-versions": svmServed, "svm-states": svmSucceeded + "\n"})
			k := &kubectl{path: f.path}
			calls := 0
			o := migrateOptions{method: methodAuto, timeout: time.Minute, pollInterval: 10 * time.Millisecond, retries: tt.retries, primary: primary,
				audit: func(context.Context) (*audit.Result, error) {
					r := tt.audits[min(calls, len(tt.audits)-1)]
					calls++
					return r, nil
				}}
			var out, errb bytes.Buffer
			err := migrate(context.Background(), k, cfg, nil, o, &out, &errb)
			if tt.wantErr != (err != nil) {
				t.Fatalf("migrate: %v, want error %v\n%s%s", err, tt.wantErr, out.String(), errb.String())
			}
			if err != nil && (!errors.Is(err, errMigrationIncomplete) || !strings.Contains(err.Error(), "run hwkms storage migrate again")) {
				t.Errorf("error %v: want errMigrationIncomplete telling to wait and re-run", err)
			}
			var got []string
			for _, m := range createdSVMs(t, f) {
				got = append(got, m.Spec.Resource.Resource)
			}
			if strings.Join(got, " ") != strings.Join(tt.wantSVMs, " ") {
				t.Errorf("migrations created for %v, want %v", got, tt.wantSVMs)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
}

// TestKeyRotatePrintsMigrate: key rotate, printing or applying, ends with the storage
// migrate command of docs/rotation.md step 4 for the key it created.
func TestKeyRotatePrintsMigrate(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-a"}
	if _, err := hsm.CreateKey(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{PKCS11: &key}}})
	for _, args := range [][]string{nil, {"--apply"}} {
		var out, errb bytes.Buffer
		if err := run(context.Background(), append([]string{"key", "rotate", "--config", path}, args...), strings.NewReader(""), &out, &errb); err != nil {
			t.Fatalf("key rotate %v: %v\n%s", args, err, errb.String())
		}
		_, rest, ok := strings.Cut(errb.String(), "created new primary key_id ")
		id, _, _ := strings.Cut(rest, ";")
		if !ok || id == "" {
			t.Fatalf("key rotate %v named no new key_id:\n%s", args, errb.String())
		}
		if want := "hwkms storage migrate --encryption-provider-config <kube-apiserver's file> --key-id " + id; !strings.Contains(errb.String(), want) {
			t.Errorf("key rotate %v does not print %q:\n%s", args, want, errb.String())
		}
		if strings.Contains(out.String(), "storage migrate") {
			t.Errorf("key rotate %v printed the hint on stdout (the config or the key_id):\n%s", args, out.String())
		}
	}
}

// TestKeyRotateMigrate: key rotate --apply --migrate writes the config, waits until the
// running hwkms serves the new key, then runs storage migrate with the flags after --
// (here forced to kubectl replace). Without a serving hwkms it stops before migrating,
// says so and prints the command; --migrate without --apply is refused.
func TestKeyRotateMigrate(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-a"}
	infoA, err := hsm.CreateKey(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{PKCS11: &key}}})
	enc := writeEncryptionConfig(t, "secrets")
	rotate := func(extra ...string) (string, string, error) {
		var out, errb bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		err := run(ctx, append([]string{"key", "rotate", "--config", path}, extra...), strings.NewReader(""), &out, &errb)
		return out.String(), errb.String(), err
	}

	if _, _, err := rotate("--migrate"); err == nil || !strings.Contains(err.Error(), "--migrate needs --apply") {
		t.Fatalf("--migrate without --apply: %v", err)
	}
	if _, _, err := rotate("--apply", "--", "--method", "replace"); err == nil || !strings.Contains(err.Error(), "unexpected arguments") {
		t.Fatalf("migrate flags without --migrate: %v", err)
	}

	// Nothing serves the socket: the config is written, nothing is migrated.
	f := newFakeKubectl(t, map[string]string{"api-versions": svmNotServed, "get-json": secretList, "replace-out": "secret/a replaced\nsecret/b replaced\n"})
	out, errOut, err := rotate("--apply", "--migrate", "--reload-timeout", "1s", "--", "--encryption-provider-config", enc, "--kubectl", f.path)
	if err == nil || !strings.Contains(err.Error(), "storage was not migrated") || !strings.Contains(errOut, "hwkms storage migrate") {
		t.Fatalf("rotate --migrate without a server: %v\n%s", err, errOut)
	}
	if f.read("replaced") != "" {
		t.Fatal("objects were rewritten before hwkms served the new key")
	}
	firstNew := strings.TrimSpace(out)

	client := startServe(t, path)
	waitKeyID(t, client, firstNew)
	out, errOut, err = rotate("--apply", "--migrate", "--", "--encryption-provider-config", enc, "--kubectl", f.path, "--method", "replace")
	if err != nil {
		t.Fatalf("rotate --apply --migrate: %v\n%s", err, errOut)
	}
	newID, rest, _ := strings.Cut(out, "\n")
	if newID == "" || newID == firstNew || newID == infoA.KeyID {
		t.Fatalf("stdout does not start with a new key_id:\n%s", out)
	}
	waitKeyID(t, client, newID)
	if !strings.Contains(errOut, "serves key_id "+newID) {
		t.Errorf("rotate did not wait for the new key to be served:\n%s", errOut)
	}
	if got := f.read("replaced"); got != secretList {
		t.Errorf("kubectl replace received %q, want kubectl get's output", got)
	}
	if !strings.Contains(rest, "secrets: kubectl replace rewrote 2 object(s)") {
		t.Errorf("the migration's report is missing:\n%s", out)
	}
	if strings.Contains(out+errOut, secretMarker) {
		t.Errorf("object contents reached the output:\n%s\n%s", out, errOut)
	}
}

// TestMigrateArgs: key rotate --migrate passes the new key_id and 5 retries unless the
// operator set --retries.
func TestMigrateArgs(t *testing.T) {
	for _, tt := range []struct {
		extra []string
		want  string
	}{
		{nil, "--key-id K --retries 5"},
		{[]string{"--method", "svm"}, "--key-id K --retries 5 --method svm"},
		{[]string{"--retries", "0"}, "--key-id K --retries 0"},
		{[]string{"--retries=2"}, "--key-id K --retries=2"},
	} {
		if got := strings.Join(migrateArgs("K", tt.extra), " "); got != tt.want {
			t.Errorf("migrateArgs(%q) = %q, want %q", tt.extra, got, tt.want)
		}
	}
}
