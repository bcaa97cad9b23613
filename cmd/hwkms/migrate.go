package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/plugin/audit"
)

// Migration methods of "storage migrate".
const (
	methodAuto    = "auto"    // svm when the API server serves storagemigration.k8s.io/v1, else replace
	methodSVM     = "svm"     // a StorageVersionMigration per resource, run by kube-controller-manager
	methodReplace = "replace" // kubectl get RESOURCE -A -o json | kubectl replace -f -
)

// svmAPIVersion is the StorageVersionMigration API "storage migrate" uses (GA in
// Kubernetes 1.37, served by default; kube-controller-manager's
// storage-version-migrator-controller runs it and needs its garbage-collector-controller).
const svmAPIVersion = "storagemigration.k8s.io/v1"

// svmResource is the StorageVersionMigration resource as kubectl names it.
const svmResource = "storageversionmigrations.storagemigration.k8s.io"

// errMigrationIncomplete means the audit after a migration still found objects under a
// KMS v2 key_id other than the primary.
var errMigrationIncomplete = errors.New("migration incomplete")

// migrateOptions are the inputs of migrate, parsed from the flags.
type migrateOptions struct {
	method        string
	timeout       time.Duration // per StorageVersionMigration
	pollInterval  time.Duration
	retries       int
	retryInterval time.Duration
	primary       string // the primary KMS v2 key_id; "" when not audited
	// audit runs the storage audit; nil when --etcd-servers was not given.
	audit func(ctx context.Context) (*audit.Result, error)
}

// runStorageMigrate is "hwkms storage migrate": it rewrites every object of every
// resource the EncryptionConfiguration lists, so that kube-apiserver encrypts each one
// again under the current primary key_id, then audits etcd and reports what is still
// under other key_ids.
func runStorageMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("storage migrate", stderr)
	var s storageFlags
	s.register(fs)
	fs.StringVar(&s.resources, "resource", "", "comma-separated resources to migrate (default: every resource the configuration lists)")
	k := kubectl{warn: stderr}
	fs.StringVar(&k.path, "kubectl", "kubectl", "the kubectl binary to run")
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig passed to kubectl (default: kubectl's own: $KUBECONFIG, ~/.kube/config)")
	var o migrateOptions
	fs.StringVar(&o.method, "method", methodAuto, "svm (StorageVersionMigration), replace (kubectl get -o json | kubectl replace), or auto: svm when the API server serves "+svmAPIVersion)
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "how long to wait for each StorageVersionMigration to succeed")
	fs.DurationVar(&o.pollInterval, "poll-interval", time.Second, "how often to read a StorageVersionMigration's conditions")
	keyID := fs.String("key-id", "", "the primary KMS v2 key_id every object must end under (default: the key_id --socket's Status reports)")
	socket := fs.String("socket", "", "hwkms's KMS v2 socket, whose Status names the primary key_id")
	fs.IntVar(&o.retries, "retries", 0, "migrate again up to N times while the audit finds objects under other key_ids (an apiserver that had not switched keys yet)")
	fs.DurationVar(&o.retryInterval, "retry-interval", time.Minute, "wait between retries (kube-apiserver polls the plugin's Status every 60 s)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if s.config == "" {
		return errors.New("storage migrate: --encryption-provider-config is required")
	}
	switch o.method {
	case methodAuto, methodSVM, methodReplace:
	default:
		return fmt.Errorf("storage migrate: --method %q: want auto, svm or replace", o.method)
	}
	if o.retries < 0 {
		return fmt.Errorf("storage migrate: --retries %d: want 0 or more", o.retries)
	}
	cfg, err := audit.LoadConfig(s.config)
	if err != nil {
		return fmt.Errorf("storage migrate: %w", err)
	}
	var only []audit.GroupResource
	for _, r := range splitList(s.resources) {
		gr, err := audit.ParseResource(r)
		if err != nil {
			return fmt.Errorf("storage migrate: --resource: %w", err)
		}
		if !cfg.Covers(gr) {
			return fmt.Errorf("storage migrate: --resource %s: the encryption configuration does not list it (nor a wildcard covering it)", gr)
		}
		only = append(only, gr)
	}
	if s.servers != "" {
		o.primary = *keyID
		if o.primary == "" && *socket != "" {
			if o.primary, err = statusKeyID(ctx, *socket); err != nil {
				return fmt.Errorf("storage migrate: --socket: %w", err)
			}
		}
		if o.primary == "" {
			return errors.New("storage migrate: with --etcd-servers, pass --key-id (the primary key_id) or --socket (hwkms's socket, whose Status names it)")
		}
		o.audit = func(ctx context.Context) (*audit.Result, error) { return s.run(ctx, stderr) }
	}
	if err := k.check(); err != nil {
		return fmt.Errorf("storage migrate: %w", err)
	}
	return migrate(ctx, &k, cfg, only, o, stdout, stderr)
}

// statusKeyID calls Status on a KMS v2 socket and returns the key_id it reports.
func statusKeyID(ctx context.Context, socket string) (string, error) {
	conn, client, err := dialKMS(socket)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return "", fmt.Errorf("Status on %s: %w", socket, err)
	}
	if st.KeyId == "" {
		return "", fmt.Errorf("Status on %s reports no key_id", socket)
	}
	return st.KeyId, nil
}

// migrate resolves the resources, picks the method, rewrites every object, and audits
// (retrying as o says) when o.audit is set.
func migrate(ctx context.Context, k *kubectl, cfg *audit.Config, only []audit.GroupResource, o migrateOptions, stdout, stderr io.Writer) error {
	targets, err := migrateTargets(ctx, k, cfg, only)
	if err != nil {
		return fmt.Errorf("storage migrate: %w", err)
	}
	if len(targets) == 0 {
		return errors.New("storage migrate: the encryption configuration lists no resource the API server serves")
	}
	method := o.method
	if method != methodReplace {
		served, err := k.serves(ctx, svmAPIVersion)
		if err != nil {
			return fmt.Errorf("storage migrate: %w", err)
		}
		switch {
		case served:
			method = methodSVM
		case method == methodSVM:
			return fmt.Errorf("storage migrate: --method svm: the API server does not serve %s (kubectl api-versions); use --method replace", svmAPIVersion)
		default:
			fmt.Fprintf(stderr, "storage migrate: the API server does not serve %s; rewriting the objects with kubectl replace\n", svmAPIVersion)
			method = methodReplace
		}
	}
	for attempt := 0; ; attempt++ {
		if err := migrateOnce(ctx, k, method, targets, o, stdout, stderr); err != nil {
			return fmt.Errorf("storage migrate: %w", err)
		}
		if o.audit == nil {
			fmt.Fprintln(stderr, "storage migrate: WARNING: etcd was not audited; pass --etcd-servers (and --key-id or --socket) to confirm nothing is left under an old key_id, or run hwkms storage audit")
			return nil
		}
		res, err := o.audit(ctx)
		if err != nil {
			return fmt.Errorf("storage migrate: objects rewritten, but the storage audit failed: %w", err)
		}
		left := leftovers(res, o.primary)
		printLeftovers(stdout, res, o.primary, left)
		if len(left) == 0 {
			return nil
		}
		var n int64
		byRes := map[string]bool{}
		for _, l := range left {
			n += l.Objects
			byRes[l.Resource] = true
		}
		if attempt >= o.retries {
			return fmt.Errorf("storage migrate: %d object(s) are still under key_ids other than the primary %s after %d migration(s): "+
				"if an apiserver had not switched to the new key_id yet (kube-apiserver polls the plugin's Status every 60 s; docs/rotation.md step 3), "+
				"wait and run hwkms storage migrate again (or pass --retries): %w", n, o.primary, attempt+1, errMigrationIncomplete)
		}
		// Migrate again only the resources that still hold old objects.
		var again []audit.GroupResource
		for _, gr := range targets {
			if byRes[gr.String()] {
				again = append(again, gr)
			}
		}
		if len(again) > 0 {
			targets = again
		}
		fmt.Fprintf(stderr, "storage migrate: %d object(s) still under other key_ids; an apiserver may not have switched to %s yet; migrating again in %s (retry %d of %d)\n",
			n, o.primary, o.retryInterval, attempt+1, o.retries)
		select {
		case <-ctx.Done():
			return fmt.Errorf("storage migrate: %w", ctx.Err())
		case <-time.After(o.retryInterval):
		}
	}
}

// migrateOnce rewrites every object of targets with method.
func migrateOnce(ctx context.Context, k *kubectl, method string, targets []audit.GroupResource, o migrateOptions, stdout, stderr io.Writer) error {
	if method == methodReplace {
		for _, gr := range targets {
			began := time.Now()
			n, skipped, err := k.replaceAll(ctx, gr)
			if err != nil {
				return fmt.Errorf("%s: %w", gr, err)
			}
			note := ""
			if skipped > 0 {
				note = fmt.Sprintf(", %d written meanwhile by someone else (so rewritten already) or deleted", skipped)
			}
			fmt.Fprintf(stdout, "%s: kubectl replace rewrote %d object(s)%s in %s\n", gr, n, note, time.Since(began).Round(time.Millisecond))
		}
		return nil
	}
	// Create every migration first: the controller runs them while we wait.
	stamp := time.Now().UTC().Format("20060102-150405") + "-" + randomHex(2)
	names := make([]string, len(targets))
	began := time.Now()
	for i, gr := range targets {
		names[i] = svmName(gr, stamp)
		if err := k.createSVM(ctx, names[i], gr); err != nil {
			return fmt.Errorf("%s: %w", gr, err)
		}
		fmt.Fprintf(stderr, "storage migrate: created StorageVersionMigration %s for %s\n", names[i], gr)
	}
	for i, gr := range targets {
		if err := k.waitSVM(ctx, names[i], o.timeout, o.pollInterval); err != nil {
			return fmt.Errorf("%s: %w", gr, err)
		}
		fmt.Fprintf(stdout, "%s: StorageVersionMigration %s succeeded (%s)\n", gr, names[i], time.Since(began).Round(time.Millisecond))
	}
	return nil
}

// svmName is a StorageVersionMigration name unique to this run: hwkms-<resource>-<stamp>,
// a DNS subdomain (resource names are lowercase letters, digits, dots and dashes).
func svmName(gr audit.GroupResource, stamp string) string {
	r := strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' {
			return c
		}
		if c >= 'A' && c <= 'Z' {
			return c + 'a' - 'A'
		}
		return '-'
	}, gr.String())
	if len(r) > 200 {
		r = r[:200]
	}
	return "hwkms-" + strings.Trim(r, ".-") + "-" + stamp
}

// migrateTargets returns the concrete resources to migrate, sorted: only if given, else
// every resource the configuration names, with its wildcards ("*.", "*.<group>",
// "*.*") expanded to the resources the API server serves that can be listed and updated
// (kubectl api-resources).
func migrateTargets(ctx context.Context, k *kubectl, cfg *audit.Config, only []audit.GroupResource) ([]audit.GroupResource, error) {
	if len(only) > 0 {
		return only, nil
	}
	seen := map[audit.GroupResource]bool{}
	var wild []audit.GroupResource
	for _, r := range cfg.Rules {
		for _, s := range r.Resources {
			gr, err := audit.ParseResource(s)
			if err != nil {
				return nil, err
			}
			if gr.Resource == "*" {
				wild = append(wild, gr)
				continue
			}
			seen[gr] = true
		}
	}
	if len(wild) > 0 {
		served, err := k.apiResources(ctx)
		if err != nil {
			return nil, err
		}
		for _, gr := range served {
			for _, w := range wild {
				if w.Group == "*" || w.Group == gr.Group {
					seen[gr] = true
				}
			}
		}
	}
	out := make([]audit.GroupResource, 0, len(seen))
	for gr := range seen {
		out = append(out, gr)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// leftover is one count the audit found under a KMS v2 key_id other than the primary.
type leftover struct {
	Resource string
	KeyID    string
	Objects  int64
}

// leftovers lists the KMS v2 objects of res not under primary, by resource and key_id.
func leftovers(res *audit.Result, primary string) []leftover {
	var out []leftover
	for _, r := range res.Resources {
		for _, c := range r.Counts {
			if c.Kind == audit.KindKMSv2 && c.KeyID != primary && c.Objects > 0 {
				out = append(out, leftover{Resource: r.Resource, KeyID: c.KeyID, Objects: c.Objects})
			}
		}
	}
	return out
}

// printLeftovers reports the audit after a migration: per resource, the objects under
// the primary and under any other key_id.
func printLeftovers(w io.Writer, res *audit.Result, primary string, left []leftover) {
	fmt.Fprintf(w, "storage audit at etcd revision %d: %d object(s) under the primary key_id %s", res.Revision, res.ObjectsUnderKeyID(primary), quoteKeyID(primary))
	if t := res.Totals; t.Unencrypted+t.Unreadable+t.Untracked > 0 {
		fmt.Fprintf(w, " (and %d unencrypted, %d unreadable, %d untracked: hwkms storage audit shows them)", t.Unencrypted, t.Unreadable, t.Untracked)
	}
	fmt.Fprintln(w)
	if len(left) == 0 {
		fmt.Fprintln(w, "no object is stored under any other KMS v2 key_id")
		return
	}
	for _, l := range left {
		fmt.Fprintf(w, "  %s: %d object(s) still under key_id %s\n", l.Resource, l.Objects, quoteKeyID(l.KeyID))
	}
}

// kubectl runs the operator's kubectl. Object contents pass from one kubectl to the
// other through a pipe and are never read, logged or printed here.
type kubectl struct {
	path, kubeconfig string
	// warn receives the warnings kube-apiserver sent kubectl replace ("Warning: ..."
	// lines of its stderr); nil drops them.
	warn io.Writer
}

// check fails clearly when the kubectl binary cannot be found.
func (k *kubectl) check() error {
	p, err := exec.LookPath(k.path)
	if err != nil {
		return fmt.Errorf("kubectl: %w (install kubectl or pass --kubectl PATH)", err)
	}
	k.path = p
	return nil
}

func (k *kubectl) command(ctx context.Context, args ...string) *exec.Cmd {
	if k.kubeconfig != "" {
		args = append([]string{"--kubeconfig", k.kubeconfig}, args...)
	}
	return exec.CommandContext(ctx, k.path, args...)
}

// output runs kubectl with stdin and returns its stdout; an error carries the last
// lines of kubectl's stderr (kubectl's own messages, no object content).
func (k *kubectl) output(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	cmd := k.command(ctx, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, tail(errb.String(), 5))
	}
	return out.Bytes(), nil
}

// serves reports whether the API server serves groupVersion (kubectl api-versions).
func (k *kubectl) serves(ctx context.Context, groupVersion string) (bool, error) {
	out, err := k.output(ctx, nil, "api-versions")
	if err != nil {
		return false, err
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(l) == groupVersion {
			return true, nil
		}
	}
	return false, nil
}

// apiResources lists the resources the API server serves that can be listed and
// updated, i.e. those stored and rewritable.
func (k *kubectl) apiResources(ctx context.Context) ([]audit.GroupResource, error) {
	out, err := k.output(ctx, nil, "api-resources", "--verbs=list,update", "-o", "name")
	if err != nil {
		return nil, err
	}
	var grs []audit.GroupResource
	for _, l := range strings.Fields(string(out)) {
		gr, err := audit.ParseResource(l)
		if err != nil {
			return nil, fmt.Errorf("kubectl api-resources: %w", err)
		}
		grs = append(grs, gr)
	}
	return grs, nil
}

// svmManifest is a StorageVersionMigration as kubectl create reads it.
type svmManifest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Resource struct {
			Group    string `json:"group"`
			Resource string `json:"resource"`
		} `json:"resource"`
	} `json:"spec"`
}

// createSVM creates the StorageVersionMigration name for gr.
func (k *kubectl) createSVM(ctx context.Context, name string, gr audit.GroupResource) error {
	var m svmManifest
	m.APIVersion, m.Kind = svmAPIVersion, "StorageVersionMigration"
	m.Metadata.Name = name
	m.Metadata.Labels = map[string]string{"app.kubernetes.io/managed-by": "hwkms"}
	m.Spec.Resource.Group, m.Spec.Resource.Resource = gr.Group, gr.Resource
	b, err := json.Marshal(&m)
	if err != nil {
		return err
	}
	_, err = k.output(ctx, b, "create", "-f", "-")
	return err
}

// svmStatus is the part of a StorageVersionMigration waitSVM reads.
type svmStatus struct {
	Status struct {
		ResourceVersion string `json:"resourceVersion"`
		Conditions      []struct {
			Type    string `json:"type"`
			Status  string `json:"status"`
			Reason  string `json:"reason"`
			Message string `json:"message"`
		} `json:"conditions"`
	} `json:"status"`
}

// waitSVM polls the StorageVersionMigration name until its Succeeded condition is
// True (nil), its Failed condition is True (an error with its reason and message), or
// timeout.
func (k *kubectl) waitSVM(ctx context.Context, name string, timeout, interval time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		out, err := k.output(ctx, nil, "get", svmResource, name, "-o", "json")
		if err != nil {
			return err
		}
		var st svmStatus
		if err := json.Unmarshal(out, &st); err != nil {
			return fmt.Errorf("StorageVersionMigration %s: kubectl get -o json: %w", name, err)
		}
		for _, c := range st.Status.Conditions {
			if c.Status != "True" {
				continue
			}
			switch c.Type {
			case "Succeeded":
				return nil
			case "Failed":
				return fmt.Errorf("StorageVersionMigration %s failed: %s: %s (kubectl get %s %s -o yaml; rerun hwkms storage migrate, or --method replace)",
					name, c.Reason, c.Message, svmResource, name)
			}
		}
		if time.Now().After(deadline) {
			why := "it has no Succeeded or Failed condition"
			if st.Status.ResourceVersion == "" {
				why = "no controller has picked it up (status.resourceVersion is empty): is kube-controller-manager running with storage-version-migrator-controller and garbage-collector-controller enabled?"
			}
			return fmt.Errorf("StorageVersionMigration %s did not succeed within %s: %s; rerun hwkms storage migrate with a longer --timeout, or --method replace", name, timeout, why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// replaceAll rewrites every object of gr with `kubectl get gr --all-namespaces -o json
// | kubectl replace -f -`, the two kubectl processes joined by a pipe. It returns the
// objects replaced and those skipped because they changed or vanished meanwhile
// (Conflict, NotFound: a write that re-encrypted them, or a delete).
func (k *kubectl) replaceAll(ctx context.Context, gr audit.GroupResource) (replaced, skipped int, err error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, 0, err
	}
	get := k.command(ctx, "get", gr.String(), "--all-namespaces", "-o", "json")
	rep := k.command(ctx, "replace", "-f", "-")
	var getErr, repOut, repErr bytes.Buffer
	get.Stdout, get.Stderr = w, &getErr
	rep.Stdin, rep.Stdout, rep.Stderr = r, &repOut, &repErr
	if err := get.Start(); err != nil {
		r.Close()
		w.Close()
		return 0, 0, fmt.Errorf("kubectl get: %w", err)
	}
	w.Close()
	if err := rep.Start(); err != nil {
		r.Close()
		get.Wait()
		return 0, 0, fmt.Errorf("kubectl replace: %w", err)
	}
	r.Close()
	gerr, rerr := get.Wait(), rep.Wait()
	if gerr != nil {
		return 0, 0, fmt.Errorf("kubectl get %s --all-namespaces -o json: %w: %s", gr, gerr, tail(getErr.String(), 5))
	}
	sc := bufio.NewScanner(&repOut)
	for sc.Scan() {
		if strings.HasSuffix(sc.Text(), " replaced") {
			replaced++
		}
	}
	var other []string
	empty := false
	for _, l := range strings.Split(repErr.String(), "\n") {
		switch {
		case strings.TrimSpace(l) == "":
		case strings.HasPrefix(l, "Warning: "):
			if k.warn != nil {
				fmt.Fprintf(k.warn, "storage migrate: %s: kubectl replace: %s\n", gr, l)
			}
		case strings.Contains(l, "no objects passed to replace"):
			empty = true
		case strings.Contains(l, "(Conflict)"), strings.Contains(l, "(NotFound)"):
			skipped++
		default:
			other = append(other, l)
		}
	}
	if len(other) > 0 || (rerr != nil && !empty && skipped == 0) {
		return replaced, skipped, fmt.Errorf("kubectl replace -f - (%d replaced): %v: %s", replaced, rerr, tail(strings.Join(other, "\n"), 5))
	}
	return replaced, skipped, nil
}

// tail returns the last n non-empty lines of s, joined with " | ".
func tail(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
