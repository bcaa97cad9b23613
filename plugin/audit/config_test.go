package audit

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const testConfig = `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets, widgets.example.com]
  providers:
  - kms: {apiVersion: v2, name: hwkms, endpoint: unix:///x.sock}
  - kms: {name: legacy, endpoint: unix:///y.sock}
  - aescbc: {keys: [{name: k1, secret: TOPSECRETAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=}, {name: k2, secret: c2Vjb25k}]}
  - identity: {}
- resources: ["*.apps"]
  providers:
  - aesgcm: {keys: [{name: g1, secret: Z2NtZ2NtZ2NtZ2NtZ2NtZ2NtZ2NtZ2NtZ2NtZ2NtZ2M=}]}
- resources: ["*."]
  providers:
  - secretbox: {keys: [{name: sb, secret: c2I=}]}
`

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig([]byte(testConfig))
	if err != nil {
		t.Fatal(err)
	}
	want := []Provider{{KindKMSv2, "hwkms"}, {KindKMSv1, "legacy"}, {KindAESCBC, "k1"}, {KindAESCBC, "k2"}, {KindIdentity, ""}}
	if got, _ := c.rule(GroupResource{"", "secrets"}); !reflect.DeepEqual(got, want) {
		t.Errorf("secrets providers = %v, want %v", got, want)
	}
	// The exact rule wins over "*.", then *.group, then *.*.
	for _, tt := range []struct {
		gr   GroupResource
		want Kind
		ok   bool
	}{
		{GroupResource{"", "secrets"}, KindKMSv2, true},
		{GroupResource{"", "configmaps"}, KindSecretbox, true},
		{GroupResource{"apps", "deployments"}, KindAESGCM, true},
		{GroupResource{"example.com", "widgets"}, KindKMSv2, true},
		{GroupResource{"example.com", "gadgets"}, "", false},
		{GroupResource{"batch", "jobs"}, "", false},
	} {
		ps, ok := c.rule(tt.gr)
		if ok != tt.ok || (ok && ps[0].Kind != tt.want) {
			t.Errorf("rule(%s) = %v %v, want first %s, covered %v", tt.gr, ps, ok, tt.want, tt.ok)
		}
	}
	all, _ := ParseConfig([]byte("resources: [{resources: ['*.*'], providers: [{identity: {}}]}]"))
	if !all.Covers(GroupResource{"batch", "jobs"}) || !all.Covers(GroupResource{"x.io", "y"}) {
		t.Error("*.* does not cover every resource")
	}
}

func TestParseConfigErrorsHideSecrets(t *testing.T) {
	for _, tt := range []struct{ name, yaml, want string }{
		{"yaml", "resources:\n- resources: [secrets]\n  providers: [{aescbc: {keys: [{name: k, secret: TOPSECRET\n", "does not parse"},
		{"no resources", "kind: EncryptionConfiguration\n", "no resources"},
		{"wrong kind", "kind: Pod\nresources: [{resources: [secrets], providers: [{identity: {}}]}]", "kind"},
		{"no providers", "resources: [{resources: [secrets], providers: []}]", "no providers"},
		{"empty provider", "resources: [{resources: [secrets], providers: [{}]}]", "providers[0]"},
		{"kms without name", "resources: [{resources: [secrets], providers: [{kms: {apiVersion: v2}}]}]", "name is empty"},
		{"bad resource", "resources: [{resources: ['a/b'], providers: [{identity: {}}]}]", "not a resource"},
	} {
		_, err := ParseConfig([]byte(tt.yaml))
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "TOPSECRET") {
			t.Errorf("%s: %v, want an error with %q and no secret", tt.name, err, tt.want)
		}
	}
}

func TestLoadConfigRefusesOtherAccess(t *testing.T) {
	p := filepath.Join(t.TempDir(), "enc.yaml")
	if err := os.WriteFile(p, []byte(testConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(p); err == nil || !strings.Contains(err.Error(), "--encryption-provider-config") {
		t.Errorf("world-readable config: %v", err)
	}
	os.Chmod(p, 0o600)
	if _, err := LoadConfig(p); err != nil {
		t.Error(err)
	}
}

func TestStorageLayout(t *testing.T) {
	for _, tt := range []struct {
		res, prefix string
	}{
		{"secrets", "secrets"},
		{"configmaps", "configmaps"},
		{"services", "services/specs"},
		{"endpoints", "services/endpoints"},
		{"nodes", "minions"},
		{"replicationcontrollers", "controllers"},
		{"deployments.apps", "deployments"},
		{"ingresses.networking.k8s.io", "ingress"},
		{"roles.rbac.authorization.k8s.io", "roles"},
		{"widgets.example.com", "example.com/widgets"},
		{"volumesnapshots.snapshot.storage.k8s.io", "snapshot.storage.k8s.io/volumesnapshots"},
		{"customresourcedefinitions.apiextensions.k8s.io", "apiextensions.k8s.io/customresourcedefinitions"},
		{"apiservices.apiregistration.k8s.io", "apiregistration.k8s.io/apiservices"},
	} {
		gr, err := parseGR(tt.res)
		if err != nil {
			t.Fatal(err)
		}
		if got := StoragePrefix(gr); got != tt.prefix {
			t.Errorf("StoragePrefix(%s) = %s, want %s", tt.res, got, tt.prefix)
		}
		if got := resourceOf(tt.prefix + "/ns/name"); got != gr && tt.res != "ingresses.networking.k8s.io" {
			t.Errorf("resourceOf(%s/ns/name) = %s, want %s", tt.prefix, got, gr)
		}
	}
	if got := resourceOf("ranges/serviceips"); got.String() != "ranges" {
		t.Errorf("resourceOf(ranges/serviceips) = %s", got)
	}
}

func TestWalkPrefixes(t *testing.T) {
	for _, tt := range []struct {
		resources []string
		want      []string
	}{
		{[]string{"secrets", "configmaps"}, []string{"configmaps/", "secrets/"}},
		{[]string{"secrets", "*.*"}, []string{""}},
		{[]string{"widgets.example.com", "*.example.com"}, []string{"example.com/"}},
		{[]string{"*.batch"}, []string{"cronjobs/", "jobs/"}},
		{[]string{"services", "endpoints"}, []string{"services/endpoints/", "services/specs/"}},
	} {
		c := &Config{Rules: []Rule{{Resources: tt.resources, Providers: []Provider{{Kind: KindIdentity}}}}}
		if got := c.walkPrefixes(nil); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("walkPrefixes(%v) = %q, want %q", tt.resources, got, tt.want)
		}
	}
}
