package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hwkms/hwkms/plugin/audit"
	"github.com/hwkms/hwkms/plugin/kek"
)

// storageFlags are kube-apiserver's etcd and encryption flags, shared by "storage audit"
// and the guard of "key destroy".
type storageFlags struct {
	servers, ca, cert, key, prefix, config string
	resources                              string
	timeout                                time.Duration
}

func (s *storageFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.servers, "etcd-servers", "", "comma-separated etcd URLs, as kube-apiserver's --etcd-servers")
	fs.StringVar(&s.ca, "etcd-cafile", "", "CA bundle verifying etcd's serving certificate")
	fs.StringVar(&s.cert, "etcd-certfile", "", "client certificate for etcd")
	fs.StringVar(&s.key, "etcd-keyfile", "", "private key of --etcd-certfile")
	fs.StringVar(&s.prefix, "etcd-prefix", "/registry", "kube-apiserver's --etcd-prefix")
	fs.StringVar(&s.config, "encryption-provider-config", "", "kube-apiserver's EncryptionConfiguration file")
	fs.DurationVar(&s.timeout, "etcd-request-timeout", 30*time.Second, "deadline of each etcd Range request")
}

// run loads the configuration, connects and audits.
func (s *storageFlags) run(ctx context.Context, stderr io.Writer) (*audit.Result, error) {
	if s.config == "" {
		return nil, errors.New("--encryption-provider-config is required")
	}
	cfg, err := audit.LoadConfig(s.config)
	if err != nil {
		return nil, err
	}
	var only []audit.GroupResource
	for _, r := range splitList(s.resources) {
		gr, err := audit.ParseResource(r)
		if err != nil {
			return nil, fmt.Errorf("--resource: %w", err)
		}
		only = append(only, gr)
	}
	cli, err := audit.DialEtcd(audit.EtcdConfig{
		Endpoints: splitList(s.servers), CAFile: s.ca, CertFile: s.cert, KeyFile: s.key,
		RequestTimeout: s.timeout,
	})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	opts := audit.Options{Prefix: s.prefix, Only: only}
	if isTerminal(stderr) {
		var last time.Time
		opts.Progress = func(n int64, prefix string) {
			if time.Since(last) >= 500*time.Millisecond {
				last = time.Now()
				fmt.Fprintf(stderr, "\r\033[Kaudited %d objects (%s)", n, prefix)
			}
		}
		defer fmt.Fprint(stderr, "\r\033[K")
	}
	return audit.Run(ctx, cli, cfg, opts)
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// runStorageAudit is "hwkms storage audit": it reads etcd with Range requests only and
// prints, per resource, how many objects each provider and each KMS v2 key_id protects.
func runStorageAudit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("storage audit", stderr)
	var s storageFlags
	s.register(fs)
	fs.StringVar(&s.resources, "resource", "", "comma-separated resources to audit (default: every resource the configuration lists)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	res, err := s.run(ctx, stderr)
	if err != nil {
		return fmt.Errorf("storage audit: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	return printAudit(stdout, res)
}

func printAudit(w io.Writer, r *audit.Result) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "etcd prefix %s at revision %d\n", r.EtcdPrefix, r.Revision)
	for _, res := range r.Resources {
		fmt.Fprintf(tw, "\n%s (%s): %d objects\n", res.Resource, res.Prefix, res.Objects)
		fmt.Fprintln(tw, "  PROVIDER\tNAME\tKEY_ID\tOBJECTS\tNOTE")
		for _, c := range res.Counts {
			note := ""
			if !c.Configured {
				note = "not in the configuration: kube-apiserver cannot read these"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%s\n", c.Kind, dash(c.Name), dash(quoteKeyID(c.KeyID)), c.Objects, note)
		}
		if res.Unreadable > 0 {
			fmt.Fprintf(tw, "  %s\t-\t-\t%d\t%s\n", audit.KindUnreadable, res.Unreadable, "no provider can read these")
		}
		if res.Untracked > 0 {
			fmt.Fprintf(tw, "  %s\t-\t(untracked)\t%d\t%s\n", audit.KindKMSv2, res.Untracked, "too many distinct key_ids to keep")
		}
	}
	t := r.Totals
	fmt.Fprintf(tw, "\nTOTAL: %d objects, %d unencrypted, %d under other providers, %d unreadable\n", t.Objects, t.Unencrypted, t.OtherProviders, t.Unreadable)
	if len(t.KeyIDs) > 0 {
		fmt.Fprintln(tw, "  KMS V2 KEY_ID\tOBJECTS\tKEY_ID_HASH (kube-apiserver metrics)")
		for _, c := range sortedKeyIDs(t.KeyIDs) {
			fmt.Fprintf(tw, "  %s\t%d\t%s\n", quoteKeyID(c.KeyID), c.Objects, kek.APIServerKeyIDHash(c.KeyID))
		}
	}
	return tw.Flush()
}

func sortedKeyIDs(m map[string]int64) []audit.Count {
	out := make([]audit.Count, 0, len(m))
	for k, n := range m {
		out = append(out, audit.Count{KeyID: k, Objects: n})
	}
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && out[j].KeyID < out[j-1].KeyID; j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

// quoteKeyID prints a key_id as is when it is plain printable ASCII, quoted otherwise
// (a stored key_id can hold any byte; it must not drive the terminal).
func quoteKeyID(s string) string {
	for _, c := range []byte(s) {
		if c <= ' ' || c > '~' {
			return fmt.Sprintf("%q", s)
		}
	}
	return s
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// destroyGuard registers the storage audit flags on key destroy's flag set and returns
// the check key destroy runs before it asks for confirmation. With --etcd-servers it
// audits every resource of --encryption-provider-config and refuses while any object
// is stored under the key_id (audit.CheckDestroy), unless --destroy-with-objects
// names exactly that number. Without --etcd-servers it only warns that nothing was
// checked.
func destroyGuard(fs *flag.FlagSet) func(ctx context.Context, keyID string, stderr io.Writer) error {
	var s storageFlags
	s.register(fs)
	override := fs.Int64("destroy-with-objects", -1, "destroy although the storage audit finds N objects under the key (they are lost): N must equal the audit's count")
	return func(ctx context.Context, keyID string, stderr io.Writer) error {
		if s.servers == "" {
			if *override >= 0 {
				return errors.New("key destroy: --destroy-with-objects needs --etcd-servers and --encryption-provider-config (the storage audit it overrides)")
			}
			fmt.Fprintf(stderr, "key destroy: WARNING: stored objects were not audited; pass --etcd-servers and --encryption-provider-config to refuse while any object is stored under key_id %s (docs/rotation.md)\n", keyID)
			return nil
		}
		res, err := s.run(ctx, stderr)
		if err != nil {
			return fmt.Errorf("key destroy: storage audit failed, nothing destroyed: %w", err)
		}
		if err := audit.CheckDestroy(res, keyID, *override); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "key destroy: storage audit at etcd revision %d: %d object(s) under key_id %s (%d objects audited)\n",
			res.Revision, res.ObjectsUnderKeyID(keyID), keyID, res.Totals.Objects)
		return nil
	}
}
