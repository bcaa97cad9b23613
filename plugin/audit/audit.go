package audit

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/hwkms/hwkms/plugin/kek"
)

// KV is one key and value a Range returned. Both alias the page buffer: copy what you
// keep.
type KV struct {
	Key, Value []byte
}

// Page is one Range answer.
type Page struct {
	KVs      []KV
	More     bool  // more keys in the range than returned
	Revision int64 // the store revision the answer was read at
}

// Ranger is the only etcd operation the audit uses: a Range of keys [key, end) read at
// revision (0: the latest), at most limit keys, with their values. It is the whole
// surface the audit can reach; nothing here can write, delete, watch or compact.
type Ranger interface {
	Range(ctx context.Context, key, end []byte, limit, revision int64) (Page, error)
}

// ErrTooLarge is returned by a Ranger when a page does not fit in one response; Run
// then asks again for fewer keys.
var ErrTooLarge = errors.New("etcd response too large")

// Options tune Run. The zero value is valid.
type Options struct {
	// Prefix is kube-apiserver's --etcd-prefix; default /registry. Like kube-apiserver,
	// a prefix without the leading slash means the same.
	Prefix string
	// Only restricts the audit to these resources, each of which the config must cover.
	Only []GroupResource
	// PageBytes is the target size of one page; default 1 MiB. The page size in keys
	// starts at 16 and adapts to it (at most doubling per page), between 1 and
	// MaxPageKeys; a page the Ranger finds too large (ErrTooLarge) is asked again with
	// half the keys.
	PageBytes int
	// MaxPageKeys caps the keys asked for in one Range; default 1000.
	MaxPageKeys int64
	// MaxKeyIDs caps the distinct (resource, provider, key_id) entries kept; default
	// 4096. Objects beyond the cap are counted in Resource.Untracked and block
	// CheckDestroy.
	MaxKeyIDs int
	// Progress, if set, is called after each page with the objects counted so far and
	// the key prefix being walked.
	Progress func(objects int64, prefix string)
}

// Count is one row of a resource's table: objects stored by one provider (and, for
// KMS v2, under one key_id).
type Count struct {
	Kind      Kind   `json:"kind"`
	Name      string `json:"name,omitempty"`
	KeyID     string `json:"key_id,omitempty"`
	KeyIDHash string `json:"key_id_hash,omitempty"`
	Objects   int64  `json:"objects"`
	// Configured is false for a provider the resource's rule does not list:
	// kube-apiserver cannot read these objects with the configuration audited.
	Configured bool `json:"configured"`
}

// Resource is what the audit found stored for one resource.
type Resource struct {
	Resource string  `json:"resource"`
	Prefix   string  `json:"etcd_prefix"`
	Objects  int64   `json:"objects"`
	Counts   []Count `json:"counts"`
	// Unencrypted counts identity objects (stored as plain JSON, protobuf or CBOR).
	Unencrypted int64 `json:"unencrypted"`
	// OtherProviders counts objects under a provider (or envelope kind) the resource's
	// rule does not list.
	OtherProviders int64 `json:"other_providers"`
	// Unreadable counts values kube-apiserver could not read: a KMS v2 prefix whose
	// EncryptedObject does not parse, truncated values, garbage.
	Unreadable int64 `json:"unreadable"`
	// Untracked counts KMS v2 objects whose key_id was not kept (MaxKeyIDs reached).
	Untracked int64 `json:"untracked"`
}

// Result is a whole audit.
type Result struct {
	EtcdPrefix string     `json:"etcd_prefix"`
	Revision   int64      `json:"revision"`
	Resources  []Resource `json:"resources"`
	Totals     Totals     `json:"totals"`
}

// Totals add up every resource.
type Totals struct {
	Objects        int64            `json:"objects"`
	Unencrypted    int64            `json:"unencrypted"`
	OtherProviders int64            `json:"other_providers"`
	Unreadable     int64            `json:"unreadable"`
	Untracked      int64            `json:"untracked"`
	KeyIDs         map[string]int64 `json:"key_ids"` // KMS v2 objects per key_id, all providers and resources
}

type countKey struct {
	kind        Kind
	name, keyID string
}

type resourceCounter struct {
	prefix     string
	configured []string           // envelope prefixes of the rule
	providers  map[Provider]bool  // the rule's providers
	counts     map[countKey]int64 //
	res        Resource           // scalar counters
}

// Run walks the prefixes holding the resources cfg covers with paged Range requests, all
// read at the revision of the first answer, and counts what it finds. It keeps only
// counters: memory does not grow with the number of keys. Values are never kept,
// printed or logged.
func Run(ctx context.Context, r Ranger, cfg *Config, o Options) (*Result, error) {
	if o.Prefix == "" {
		o.Prefix = "/registry"
	}
	// kube-apiserver's etcd3 store joins its prefix to "/": "registry", "/registry" and
	// "/registry/" are the same keys.
	o.Prefix = strings.TrimRight(path.Join("/", o.Prefix), "/")
	if o.PageBytes <= 0 {
		o.PageBytes = 1 << 20
	}
	if o.MaxPageKeys <= 0 {
		o.MaxPageKeys = 1000
	}
	if o.MaxKeyIDs <= 0 {
		o.MaxKeyIDs = 4096
	}
	for _, gr := range o.Only {
		if !cfg.Covers(gr) {
			return nil, fmt.Errorf("--resource %s: the encryption configuration does not list it (nor a wildcard covering it)", gr)
		}
	}
	w := &walker{r: r, cfg: cfg, o: o, byRes: map[GroupResource]*resourceCounter{}}
	for _, p := range cfg.walkPrefixes(o.Only) {
		if err := w.walk(ctx, p); err != nil {
			return nil, err
		}
	}
	return w.result(), nil
}

type walker struct {
	r       Ranger
	cfg     *Config
	o       Options
	byRes   map[GroupResource]*resourceCounter
	rev     int64
	objects int64
	tracked int
	limit   int64
}

func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0} // every key
}

func (w *walker) walk(ctx context.Context, rel string) error {
	base := w.o.Prefix + "/"
	start := []byte(base + rel)
	end := prefixEnd(start)
	if w.limit == 0 {
		w.limit = min(16, w.o.MaxPageKeys)
	}
	key := start
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		page, err := w.r.Range(ctx, key, end, w.limit, w.rev)
		if errors.Is(err, ErrTooLarge) && w.limit > 1 {
			w.limit /= 2
			continue
		}
		if err != nil {
			return fmt.Errorf("range %s: %w", string(start), err)
		}
		if w.rev == 0 {
			w.rev = page.Revision
		}
		largest := 0
		for _, kv := range page.KVs {
			largest = max(largest, len(kv.Value)+len(kv.Key))
			w.count(kv, base)
		}
		if len(page.KVs) == 0 || !page.More {
			break
		}
		last := page.KVs[len(page.KVs)-1].Key
		key = append(append(make([]byte, 0, len(last)+1), last...), 0)
		w.adapt(largest, len(page.KVs))
		if w.o.Progress != nil {
			w.o.Progress(w.objects, base+rel)
		}
	}
	if w.o.Progress != nil {
		w.o.Progress(w.objects, base+rel)
	}
	return nil
}

// adapt sizes the next page so it would hold about PageBytes if every value were as
// large as this page's largest.
func (w *walker) adapt(largest, n int) {
	if n == 0 {
		return
	}
	per := largest + 1
	next := int64(w.o.PageBytes / per)
	if next > 2*w.limit {
		next = 2 * w.limit
	}
	w.limit = min(max(next, 1), w.o.MaxPageKeys)
}

func (w *walker) counter(gr GroupResource) *resourceCounter {
	if rc := w.byRes[gr]; rc != nil {
		return rc
	}
	ps, _ := w.cfg.rule(gr)
	rc := &resourceCounter{
		prefix:    w.o.Prefix + "/" + StoragePrefix(gr) + "/",
		providers: map[Provider]bool{},
		counts:    map[countKey]int64{},
		res:       Resource{Resource: gr.String()},
	}
	for _, p := range ps {
		rc.providers[p] = true
		if pre := p.prefix(); pre != "" {
			rc.configured = append(rc.configured, pre)
		}
	}
	w.byRes[gr] = rc
	return rc
}

func (w *walker) count(kv KV, base string) {
	rel := strings.TrimPrefix(string(kv.Key), base)
	rc := w.counter(resourceOf(rel))
	w.objects++
	rc.res.Objects++
	v := Classify(kv.Value, rc.configured)
	switch v.Kind {
	case KindUnreadable:
		rc.res.Unreadable++
		return
	case KindIdentity:
		rc.res.Unencrypted++
	}
	p := Provider{Kind: v.Kind, Name: v.Name}
	if !rc.providers[p] {
		rc.res.OtherProviders++
	}
	k := countKey{kind: v.Kind, name: v.Name, keyID: v.KeyID}
	if _, ok := rc.counts[k]; !ok {
		if w.tracked >= w.o.MaxKeyIDs {
			rc.res.Untracked++
			return
		}
		w.tracked++
	}
	rc.counts[k]++
}

func (w *walker) result() *Result {
	r := &Result{EtcdPrefix: w.o.Prefix, Revision: w.rev, Totals: Totals{KeyIDs: map[string]int64{}}}
	for _, rc := range w.byRes {
		res := rc.res
		res.Prefix = rc.prefix
		for k, n := range rc.counts {
			res.Counts = append(res.Counts, Count{
				Kind: k.kind, Name: k.name, KeyID: k.keyID, KeyIDHash: kek.APIServerKeyIDHash(k.keyID),
				Objects: n, Configured: rc.providers[Provider{Kind: k.kind, Name: k.name}],
			})
			if k.kind == KindKMSv2 {
				r.Totals.KeyIDs[k.keyID] += n
			}
		}
		sort.Slice(res.Counts, func(i, j int) bool {
			a, b := res.Counts[i], res.Counts[j]
			if a.Kind != b.Kind {
				return a.Kind < b.Kind
			}
			if a.Name != b.Name {
				return a.Name < b.Name
			}
			return a.KeyID < b.KeyID
		})
		r.Resources = append(r.Resources, res)
		r.Totals.Objects += res.Objects
		r.Totals.Unencrypted += res.Unencrypted
		r.Totals.OtherProviders += res.OtherProviders
		r.Totals.Unreadable += res.Unreadable
		r.Totals.Untracked += res.Untracked
	}
	sort.Slice(r.Resources, func(i, j int) bool { return r.Resources[i].Resource < r.Resources[j].Resource })
	return r
}

// ObjectsUnderKeyID counts the KMS v2 objects stored under keyID, in every resource and
// provider the audit walked.
func (r *Result) ObjectsUnderKeyID(keyID string) int64 { return r.Totals.KeyIDs[keyID] }

// ErrObjectsStored means a key_id still protects stored objects (or the audit cannot
// rule it out): destroying the key would lose them.
var ErrObjectsStored = errors.New("objects are still stored under this key")

// CheckDestroy is the guard key destroy runs with a fresh audit. It refuses while any
// object might be stored under keyID: the objects under it, plus every object whose
// key_id the audit could not read (unreadable) or keep (untracked). An operator who
// accepts losing them passes override equal to exactly that number, so the decision
// names what is lost; override < 0 means none was given.
func CheckDestroy(r *Result, keyID string, override int64) error {
	if r == nil {
		return errors.New("key destroy: no storage audit result")
	}
	if keyID == "" {
		return errors.New("key destroy: empty key_id")
	}
	live := r.ObjectsUnderKeyID(keyID)
	atRisk := live + r.Totals.Unreadable + r.Totals.Untracked
	if atRisk == 0 {
		if override > 0 {
			return fmt.Errorf("key destroy: --destroy-with-objects=%d, but the audit found no object under key_id %s: pass no override", override, keyID)
		}
		return nil
	}
	if override == atRisk {
		return nil
	}
	msg := fmt.Sprintf("key destroy: %d object(s) stored under key_id %s", live, keyID)
	if n := r.Totals.Unreadable + r.Totals.Untracked; n > 0 {
		msg += fmt.Sprintf(", and %d whose key_id the audit could not tell (%d unreadable, %d untracked)", n, r.Totals.Unreadable, r.Totals.Untracked)
	}
	msg += fmt.Sprintf(" at etcd revision %d; migrate them (docs/rotation.md) and audit again", r.Revision)
	if override >= 0 {
		msg += fmt.Sprintf("; --destroy-with-objects=%d does not match the %d at risk", override, atRisk)
	} else {
		msg += fmt.Sprintf(", or pass --destroy-with-objects=%d to lose them", atRisk)
	}
	return fmt.Errorf("%s: %w", msg, ErrObjectsStored)
}
