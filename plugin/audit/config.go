package audit

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/plugin/files"
)

// maxConfigBytes caps the EncryptionConfiguration file read.
const maxConfigBytes = 1 << 20

// Provider is one provider of a rule, as it appears in a stored value's prefix.
type Provider struct {
	Kind Kind   `json:"kind"`
	Name string `json:"name,omitempty"`
}

// prefix is the envelope prefix this provider writes ("" for identity).
func (p Provider) prefix() string {
	for _, kp := range kindPrefixes {
		if kp.kind == p.Kind {
			return kp.prefix + p.Name + ":"
		}
	}
	return ""
}

// Rule is one entry of the configuration's resources list.
type Rule struct {
	Resources []string   // as written: "secrets", "deployments.apps", "*.", "*.apps", "*.*"
	Providers []Provider // in order; the first one writes
}

// Config is the part of a kube-apiserver EncryptionConfiguration the audit needs. It
// holds no key secret.
type Config struct {
	Rules []Rule
}

// The subset of apiserver.config.k8s.io/v1 EncryptionConfiguration read here. Key
// secrets are not decoded.
type fileConfig struct {
	Kind      string `json:"kind"`
	Resources []struct {
		Resources []string `json:"resources"`
		Providers []struct {
			AESGCM    *fileKeys `json:"aesgcm"`
			AESCBC    *fileKeys `json:"aescbc"`
			Secretbox *fileKeys `json:"secretbox"`
			Identity  *struct{} `json:"identity"`
			KMS       *struct {
				APIVersion string `json:"apiVersion"`
				Name       string `json:"name"`
			} `json:"kms"`
		} `json:"providers"`
	} `json:"resources"`
}

type fileKeys struct {
	Keys []struct {
		Name string `json:"name"`
	} `json:"keys"`
}

// LoadConfig reads an EncryptionConfiguration file (the file kube-apiserver's
// --encryption-provider-config names). The file holds key secrets, so it is read with
// files.ReadSecret's rules (no access for other users) and its buffer is cleared.
func LoadConfig(path string) (*Config, error) {
	b, err := files.ReadSecret(path, files.SecretOptions{MaxBytes: maxConfigBytes})
	if err != nil {
		return nil, fmt.Errorf("--encryption-provider-config: %w", err)
	}
	defer clear(b)
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("--encryption-provider-config %s: %w", path, err)
	}
	return c, nil
}

// ParseConfig parses EncryptionConfiguration YAML or JSON. Errors name the entry, never
// a secret.
func ParseConfig(b []byte) (*Config, error) {
	var f fileConfig
	if err := yaml.Unmarshal(b, &f); err != nil {
		// The YAML library's message can quote the offending line, which may hold a key.
		return nil, errors.New("not a valid EncryptionConfiguration (YAML or JSON does not parse)")
	}
	if f.Kind != "" && f.Kind != "EncryptionConfiguration" {
		return nil, fmt.Errorf("kind is %q, want EncryptionConfiguration", f.Kind)
	}
	if len(f.Resources) == 0 {
		return nil, errors.New("no resources listed")
	}
	c := &Config{}
	for i, r := range f.Resources {
		if len(r.Resources) == 0 {
			return nil, fmt.Errorf("resources[%d]: no resources listed", i)
		}
		rule := Rule{Resources: r.Resources}
		for j, p := range r.Providers {
			where := fmt.Sprintf("resources[%d].providers[%d]", i, j)
			switch {
			case p.KMS != nil:
				if p.KMS.Name == "" {
					return nil, fmt.Errorf("%s.kms: name is empty", where)
				}
				k := KindKMSv1
				if p.KMS.APIVersion == "v2" {
					k = KindKMSv2
				}
				rule.Providers = append(rule.Providers, Provider{Kind: k, Name: p.KMS.Name})
			case p.AESCBC != nil:
				rule.Providers = appendKeys(rule.Providers, KindAESCBC, p.AESCBC)
			case p.AESGCM != nil:
				rule.Providers = appendKeys(rule.Providers, KindAESGCM, p.AESGCM)
			case p.Secretbox != nil:
				rule.Providers = appendKeys(rule.Providers, KindSecretbox, p.Secretbox)
			case p.Identity != nil:
				rule.Providers = append(rule.Providers, Provider{Kind: KindIdentity})
			default:
				return nil, fmt.Errorf("%s: none of kms, aescbc, aesgcm, secretbox, identity", where)
			}
		}
		if len(rule.Providers) == 0 {
			return nil, fmt.Errorf("resources[%d]: no providers", i)
		}
		for _, res := range r.Resources {
			if _, err := parseGR(res); err != nil {
				return nil, fmt.Errorf("resources[%d]: %w", i, err)
			}
		}
		c.Rules = append(c.Rules, rule)
	}
	return c, nil
}

func appendKeys(ps []Provider, k Kind, keys *fileKeys) []Provider {
	for _, key := range keys.Keys {
		ps = append(ps, Provider{Kind: k, Name: key.Name})
	}
	return ps
}

// GroupResource is a resource and its API group ("" for the core group).
type GroupResource struct {
	Group, Resource string
}

// String is the form an EncryptionConfiguration uses: "secrets", "deployments.apps".
func (g GroupResource) String() string {
	if g.Group == "" {
		if g.Resource == "*" {
			return "*."
		}
		return g.Resource
	}
	return g.Resource + "." + g.Group
}

// parseGR splits "resource.group" at the first dot, as kube-apiserver's
// schema.ParseGroupResource does: "*." is every core resource, "*.apps" every
// resource of apps, "*.*" every resource.
func parseGR(s string) (GroupResource, error) {
	if s == "" || strings.ContainsAny(s, "/ \t\n") {
		return GroupResource{}, fmt.Errorf("resource %q is not a resource name", s)
	}
	res, group, _ := strings.Cut(s, ".")
	if res == "" {
		return GroupResource{}, fmt.Errorf("resource %q has no resource name", s)
	}
	if group == "*" && res != "*" {
		return GroupResource{}, fmt.Errorf("resource %q: only *.* may name every group", s)
	}
	return GroupResource{Group: group, Resource: res}, nil
}

// rule returns the providers kube-apiserver uses for gr: those of the rules naming gr
// exactly, else "*.<group>", else "*.*"; ok is false if no rule covers gr.
func (c *Config) rule(gr GroupResource) (ps []Provider, ok bool) {
	for _, want := range []GroupResource{gr, {Group: gr.Group, Resource: "*"}, {Group: "*", Resource: "*"}} {
		for _, r := range c.Rules {
			for _, s := range r.Resources {
				if g, _ := parseGR(s); g == want {
					ps, ok = append(ps, r.Providers...), true
				}
			}
		}
		if ok {
			return ps, true
		}
	}
	return nil, false
}

// Covers reports whether the configuration names gr, exactly or by a wildcard.
func (c *Config) Covers(gr GroupResource) bool {
	_, ok := c.rule(gr)
	return ok
}

// ParseResource parses a resource as an EncryptionConfiguration names it.
func ParseResource(s string) (GroupResource, error) { return parseGR(s) }

// specialPrefixes are the built-in resources not stored under their own name
// (kube-apiserver's SpecialDefaultResourcePrefixes).
var specialPrefixes = map[GroupResource]string{
	{"", "replicationcontrollers"}:        "controllers",
	{"", "endpoints"}:                     "services/endpoints",
	{"", "nodes"}:                         "minions",
	{"", "services"}:                      "services/specs",
	{"extensions", "ingresses"}:           "ingress",
	{"networking.k8s.io", "ingresses"}:    "ingress",
	{"extensions", "podsecuritypolicies"}: "podsecuritypolicy",
	{"policy", "podsecuritypolicies"}:     "podsecuritypolicy",
}

// builtin lists Kubernetes v1.37's built-in resources stored in etcd, by group. It is
// used to expand "*." and "*.<built-in group>" and to name what a key under a
// "*.*" walk belongs to.
var builtin = map[string][]string{
	"": {"configmaps", "endpoints", "events", "limitranges", "namespaces", "nodes",
		"persistentvolumeclaims", "persistentvolumes", "pods", "podtemplates",
		"replicationcontrollers", "resourcequotas", "secrets", "serviceaccounts", "services"},
	"admissionregistration.k8s.io": {"mutatingadmissionpolicies", "mutatingadmissionpolicybindings",
		"mutatingwebhookconfigurations", "validatingadmissionpolicies",
		"validatingadmissionpolicybindings", "validatingwebhookconfigurations"},
	"apps":                         {"controllerrevisions", "daemonsets", "deployments", "replicasets", "statefulsets"},
	"autoscaling":                  {"horizontalpodautoscalers"},
	"batch":                        {"cronjobs", "jobs"},
	"certificates.k8s.io":          {"certificatesigningrequests", "clustertrustbundles", "podcertificaterequests"},
	"coordination.k8s.io":          {"leasecandidates", "leases"},
	"discovery.k8s.io":             {"endpointslices"},
	"events.k8s.io":                {},
	"flowcontrol.apiserver.k8s.io": {"flowschemas", "prioritylevelconfigurations"},
	"internal.apiserver.k8s.io":    {"storageversions"},
	"networking.k8s.io":            {"ingressclasses", "ingresses", "ipaddresses", "networkpolicies", "servicecidrs"},
	"node.k8s.io":                  {"runtimeclasses"},
	"policy":                       {"poddisruptionbudgets"},
	"rbac.authorization.k8s.io":    {"clusterrolebindings", "clusterroles", "rolebindings", "roles"},
	"resource.k8s.io":              {"deviceclasses", "devicetaintrules", "resourceclaims", "resourceclaimtemplates", "resourceslices"},
	"scheduling.k8s.io":            {"priorityclasses"},
	"storage.k8s.io":               {"csidrivers", "csinodes", "csistoragecapacities", "storageclasses", "volumeattachments", "volumeattributesclasses"},
	"storagemigration.k8s.io":      {"storageversionmigrations"},
	"extensions":                   {},
}

// groupPathGroups are built-in groups stored, like custom resources, at <group>/<resource>.
var groupPathGroups = map[string]bool{"apiextensions.k8s.io": true, "apiregistration.k8s.io": true}

// StoragePrefix is the path, below --etcd-prefix and without slashes around it, where
// kube-apiserver stores gr: "secrets", "services/specs", "example.com/widgets".
func StoragePrefix(gr GroupResource) string {
	if p, ok := specialPrefixes[gr]; ok {
		return p
	}
	if _, ok := builtin[gr.Group]; ok && !groupPathGroups[gr.Group] {
		return gr.Resource
	}
	return gr.Group + "/" + gr.Resource
}

// reverse maps a built-in storage path to its resource, for keys found by a walk.
var reverse = func() map[string]GroupResource {
	m := map[string]GroupResource{}
	groups := make([]string, 0, len(builtin))
	for g := range builtin {
		groups = append(groups, g)
	}
	sort.Strings(groups) // "" (core) first: a core resource wins a shared path (events)
	for _, g := range groups {
		for _, r := range builtin[g] {
			gr := GroupResource{g, r}
			if _, dup := m[StoragePrefix(gr)]; !dup {
				m[StoragePrefix(gr)] = gr
			}
		}
	}
	return m
}()

// resourceOf names the resource a key (relative to --etcd-prefix, without the leading
// slash) belongs to.
func resourceOf(rel string) GroupResource {
	first, rest, _ := strings.Cut(rel, "/")
	if first == "services" {
		second, _, _ := strings.Cut(rest, "/")
		if gr, ok := reverse["services/"+second]; ok {
			return gr
		}
	}
	if strings.Contains(first, ".") {
		second, _, _ := strings.Cut(rest, "/")
		return GroupResource{Group: first, Resource: second}
	}
	if gr, ok := reverse[first]; ok {
		return gr
	}
	return GroupResource{Resource: first}
}

// walkPrefixes returns the key prefixes (relative to --etcd-prefix, ending in "/", or
// "" for everything) that hold the resources c covers, restricted to only if it is not
// empty, with no prefix inside another.
func (c *Config) walkPrefixes(only []GroupResource) []string {
	var ps []string
	add := func(gr GroupResource) {
		switch {
		case gr.Group == "*":
			ps = append(ps, "")
		case gr.Resource == "*":
			if rs, ok := builtin[gr.Group]; ok && !groupPathGroups[gr.Group] {
				for _, r := range rs {
					ps = append(ps, StoragePrefix(GroupResource{gr.Group, r})+"/")
				}
			} else {
				ps = append(ps, gr.Group+"/")
			}
		default:
			ps = append(ps, StoragePrefix(gr)+"/")
		}
	}
	if len(only) > 0 {
		for _, gr := range only {
			add(gr)
		}
	} else {
		for _, r := range c.Rules {
			for _, s := range r.Resources {
				gr, _ := parseGR(s)
				add(gr)
			}
		}
	}
	sort.Strings(ps)
	var out []string
	for _, p := range ps {
		if len(out) > 0 && strings.HasPrefix(p, out[len(out)-1]) {
			continue // "" sorts first and contains everything; "a/" contains "a/b/"
		}
		out = append(out, p)
	}
	return out
}
