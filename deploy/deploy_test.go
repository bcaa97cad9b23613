package deploy

import (
	"go/ast"
	"go/parser"
	"go/token"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/plugin/config"
)

// The subset of a core/v1 Pod that the manifest uses. Decoding is strict, so a field
// the manifest has and this struct lacks (a typo, or a field nobody checked) fails.
type pod struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		PriorityClassName             string      `json:"priorityClassName"`
		HostNetwork                   bool        `json:"hostNetwork"`
		DNSPolicy                     string      `json:"dnsPolicy"`
		TerminationGracePeriodSeconds int         `json:"terminationGracePeriodSeconds"`
		Containers                    []container `json:"containers"`
		Volumes                       []struct {
			Name     string `json:"name"`
			HostPath *struct {
				Path string `json:"path"`
				Type string `json:"type"`
			} `json:"hostPath"`
		} `json:"volumes"`
	} `json:"spec"`
}

type container struct {
	Name            string   `json:"name"`
	Image           string   `json:"image"`
	ImagePullPolicy string   `json:"imagePullPolicy"`
	Command         []string `json:"command"`
	ReadinessProbe  *probe   `json:"readinessProbe"`
	LivenessProbe   *probe   `json:"livenessProbe"`
	StartupProbe    *probe   `json:"startupProbe"`
	Resources       struct {
		Requests map[string]string `json:"requests"`
		Limits   map[string]string `json:"limits"`
	} `json:"resources"`
	SecurityContext struct {
		Privileged               bool `json:"privileged"`
		AllowPrivilegeEscalation bool `json:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   bool `json:"readOnlyRootFilesystem"`
		RunAsUser                int  `json:"runAsUser"`
		Capabilities             struct {
			Drop []string `json:"drop"`
		} `json:"capabilities"`
		SeccompProfile struct {
			Type string `json:"type"`
		} `json:"seccompProfile"`
	} `json:"securityContext"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
		ReadOnly  bool   `json:"readOnly"`
	} `json:"volumeMounts"`
}

type probe struct {
	HTTPGet struct {
		Host   string `json:"host"`
		Path   string `json:"path"`
		Port   int    `json:"port"`
		Scheme string `json:"scheme"`
	} `json:"httpGet"`
	InitialDelaySeconds int `json:"initialDelaySeconds"`
	PeriodSeconds       int `json:"periodSeconds"`
	TimeoutSeconds      int `json:"timeoutSeconds"`
	FailureThreshold    int `json:"failureThreshold"`
}

type encryptionConfig struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Resources  []struct {
		Resources []string `json:"resources"`
		Providers []struct {
			KMS *struct {
				APIVersion string `json:"apiVersion"`
				Name       string `json:"name"`
				Endpoint   string `json:"endpoint"`
				Timeout    string `json:"timeout"`
			} `json:"kms"`
			Identity *struct{} `json:"identity"`
		} `json:"providers"`
	} `json:"resources"`
}

func readStrict(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func exampleConfig(t *testing.T) *config.Config {
	t.Helper()
	data, err := os.ReadFile("hwkms.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(data)
	if err != nil {
		t.Fatalf("deploy/hwkms.yaml: %v", err)
	}
	return cfg
}

// cliFlags returns the command names of cmd/hwkms's command table and, for each command function
// (cmdServe, cmdDoctor, ...), the flags it defines, read from the source.
func cliFlags(t *testing.T) (commands map[string]bool, flags map[string]map[string]bool) {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, filepath.Join("..", "cmd", "hwkms"), func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	commands, flags = map[string]bool{}, map[string]map[string]bool{}
	for _, p := range pkgs {
		for _, f := range p.Files {
			for _, decl := range f.Decls {
				fn, ok := decl.(*ast.FuncDecl)
				if !ok {
					continue
				}
				ast.Inspect(fn, func(n ast.Node) bool {
					switch n := n.(type) {
					case *ast.KeyValueExpr:
						// The command table: {name: "serve", ...} entries in func table.
						if key, ok := n.Key.(*ast.Ident); fn.Name.Name == "table" && ok && key.Name == "name" {
							if lit, ok := n.Value.(*ast.BasicLit); ok && lit.Kind == token.STRING {
								s, _ := strconv.Unquote(lit.Value)
								commands[s] = true
							}
						}
					case *ast.CallExpr:
						sel, ok := n.Fun.(*ast.SelectorExpr)
						if !ok || len(n.Args) == 0 {
							return true
						}
						switch sel.Sel.Name {
						case "String", "Bool", "Duration", "Int":
						default:
							return true
						}
						if id, ok := sel.X.(*ast.Ident); !ok || id.Name != "fs" {
							return true
						}
						if lit, ok := n.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
							s, _ := strconv.Unquote(lit.Value)
							if flags[fn.Name.Name] == nil {
								flags[fn.Name.Name] = map[string]bool{}
							}
							flags[fn.Name.Name][s] = true
						}
					}
					return true
				})
			}
		}
	}
	return commands, flags
}

// checkCommandLine checks that argv (hwkms SUBCOMMAND --flag=value ...) names a real
// subcommand and only flags that subcommand defines.
func checkCommandLine(t *testing.T, where string, argv []string) {
	t.Helper()
	commands, flags := cliFlags(t)
	if len(argv) < 2 || filepath.Base(argv[0]) != "hwkms" {
		t.Fatalf("%s: command %q does not run hwkms SUBCOMMAND", where, argv)
	}
	sub := argv[1]
	if !commands[sub] {
		t.Fatalf("%s: hwkms has no subcommand %q", where, sub)
	}
	defined := flags["cmd"+strings.ToUpper(sub[:1])+sub[1:]]
	for _, a := range argv[2:] {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !defined[name] {
			t.Errorf("%s: hwkms %s has no flag --%s (it has %v)", where, sub, name, defined)
		}
	}
}

func TestExampleConfigParses(t *testing.T) {
	cfg := exampleConfig(t)
	if cfg.Metrics.Address == "" || cfg.Metrics.AllowNonLoopback {
		t.Fatalf("example should enable metrics on loopback: %+v", cfg.Metrics)
	}
	if len(cfg.Keys) < 2 || cfg.Keys[0].PKCS11 == nil || cfg.Keys[1].TPM == nil {
		t.Fatal("example should show a pkcs11 primary and a tpm decrypt-only key")
	}
}

func TestEncryptionConfigMatchesExample(t *testing.T) {
	var ec encryptionConfig
	readStrict(t, "encryption-config.yaml", &ec)
	if ec.APIVersion != "apiserver.config.k8s.io/v1" || ec.Kind != "EncryptionConfiguration" {
		t.Fatalf("apiVersion/kind: %s %s", ec.APIVersion, ec.Kind)
	}
	cfg := exampleConfig(t)
	if len(ec.Resources) != 1 || len(ec.Resources[0].Providers) == 0 || ec.Resources[0].Providers[0].KMS == nil {
		t.Fatal("the first provider must be kms")
	}
	kms := ec.Resources[0].Providers[0].KMS
	if kms.APIVersion != "v2" {
		t.Errorf("kms apiVersion %q, want v2", kms.APIVersion)
	}
	if kms.Endpoint != "unix://"+cfg.Socket.Path {
		t.Errorf("endpoint %q does not match socket.path %q of hwkms.yaml", kms.Endpoint, cfg.Socket.Path)
	}
	if kms.Timeout != cfg.Timeout.D().String() {
		t.Errorf("provider timeout %q differs from hwkms.yaml timeout %s", kms.Timeout, cfg.Timeout.D())
	}
}

func TestStaticPodManifest(t *testing.T) {
	var p pod
	readStrict(t, filepath.Join("kubernetes", "hwkms-static-pod.yaml"), &p)
	if p.APIVersion != "v1" || p.Kind != "Pod" {
		t.Fatalf("apiVersion/kind %q/%q, want v1/Pod", p.APIVersion, p.Kind)
	}
	if p.Metadata.Namespace != "kube-system" || p.Spec.PriorityClassName != "system-node-critical" {
		t.Errorf("namespace %q, priorityClassName %q", p.Metadata.Namespace, p.Spec.PriorityClassName)
	}
	if !p.Spec.HostNetwork {
		t.Error("hostNetwork must be true: the kubelet probes the loopback metrics port of the host")
	}
	if len(p.Spec.Containers) != 1 {
		t.Fatalf("%d containers", len(p.Spec.Containers))
	}
	c := p.Spec.Containers[0]
	checkCommandLine(t, "static pod", c.Command)

	cfg := exampleConfig(t)
	hostPaths := map[string]string{}
	for _, v := range p.Spec.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s is not a hostPath", v.Name)
			continue
		}
		hostPaths[v.Name] = v.HostPath.Path
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		if _, ok := hostPaths[m.Name]; !ok {
			t.Errorf("mount of unknown volume %s", m.Name)
		}
		mounts[m.MountPath] = hostPaths[m.Name]
	}
	sockDir := filepath.Dir(cfg.Socket.Path)
	if mounts[sockDir] != sockDir {
		t.Errorf("socket dir %s is not mounted from the same host path (mounts %v)", sockDir, mounts)
	}
	if mounts["/etc/hwkms"] != "/etc/hwkms" {
		t.Error("config directory /etc/hwkms is not mounted from the host")
	}
	_, port, _ := net.SplitHostPort(cfg.Metrics.Address)
	for name, pr := range map[string]*probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe, "startup": c.StartupProbe} {
		if pr == nil {
			t.Errorf("no %s probe", name)
			continue
		}
		if pr.HTTPGet.Host != "127.0.0.1" || strconv.Itoa(pr.HTTPGet.Port) != port {
			t.Errorf("%s probe %s:%d does not match metrics.address %s", name, pr.HTTPGet.Host, pr.HTTPGet.Port, cfg.Metrics.Address)
		}
	}
	if c.ReadinessProbe.HTTPGet.Path != "/healthz" || c.LivenessProbe.HTTPGet.Path != "/livez" {
		t.Error("readiness must use /healthz (device health), liveness /livez (never the device)")
	}
	if g := p.Spec.TerminationGracePeriodSeconds; g <= int(cfg.ShutdownTimeout.D().Seconds()) {
		t.Errorf("terminationGracePeriodSeconds %d must exceed shutdownTimeout %s", g, cfg.ShutdownTimeout.D())
	}
	sc := c.SecurityContext
	if sc.AllowPrivilegeEscalation || !sc.ReadOnlyRootFilesystem || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("securityContext not hardened: %+v", sc)
	}
}

// TestReadmeHSMConfig: the config the README tells an operator to write for a real
// HSM parses, and enables the metrics listener on the port the static pod probes (a
// config without it makes kubelet restart the pod forever).
func TestReadmeHSMConfig(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(data)
	i := strings.Index(readme, "Write `/etc/hwkms/hwkms.yaml`")
	if i < 0 {
		t.Fatal("README no longer shows the /etc/hwkms/hwkms.yaml example")
	}
	start := strings.Index(readme[i:], "```yaml\n")
	end := strings.Index(readme[i+start+8:], "```")
	if start < 0 || end < 0 {
		t.Fatal("README example is not a yaml code block")
	}
	var lines []string
	for _, l := range strings.Split(readme[i+start+8:i+start+8+end], "\n") {
		lines = append(lines, strings.TrimPrefix(l, "   ")) // the block is indented in a list item
	}
	cfg, err := config.Parse([]byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatalf("README's HSM config does not parse: %v", err)
	}
	var p pod
	readStrict(t, filepath.Join("kubernetes", "hwkms-static-pod.yaml"), &p)
	host, port, err := net.SplitHostPort(cfg.Metrics.Address)
	probe := p.Spec.Containers[0].StartupProbe.HTTPGet
	if err != nil || host != probe.Host || port != strconv.Itoa(probe.Port) {
		t.Errorf("README's config has metrics.address %q; the static pod probes %s:%d", cfg.Metrics.Address, probe.Host, probe.Port)
	}
}

// unitDirectives parses a systemd unit into key -> values (repeated keys accumulate).
func unitDirectives(t *testing.T, path string) map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := map[string][]string{}
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' || l[0] == ';' || l[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			t.Fatalf("%s: bad line %q", path, l)
		}
		d[k] = append(d[k], v)
	}
	return d
}

func TestSystemdUnitHardening(t *testing.T) {
	unit := filepath.Join("systemd", "hwkms.service")
	d := unitDirectives(t, unit)
	for k, want := range map[string]string{
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "strict",
		"PrivateTmp":              "yes",
		"ProtectHome":             "yes",
		"CapabilityBoundingSet":   "",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
		"DevicePolicy":            "closed",
		"Type":                    "notify", // serve sends READY=1 once the socket accepts
		"NotifyAccess":            "main",
	} {
		if got := d[k]; len(got) != 1 || got[0] != want {
			t.Errorf("%s=%q, want %q", k, got, want)
		}
	}
	cfg := exampleConfig(t)
	sockDir := strings.Replace(filepath.Dir(cfg.Socket.Path), "/var/run/", "/run/", 1)
	if rw := d["ReadWritePaths"]; len(rw) != 1 || rw[0] != sockDir {
		t.Errorf("ReadWritePaths=%q, want only the socket directory %s", rw, sockDir)
	}
	for _, dev := range d["DeviceAllow"] {
		if !strings.HasPrefix(dev, "/dev/tpmrm") && !strings.HasPrefix(dev, "/dev/bus/usb") {
			t.Errorf("DeviceAllow=%s is more than the TPM or HSM needs", dev)
		}
		// Without capabilities root opens tss:tss 0660 /dev/tpmrm0 only as a tss member.
		if strings.HasPrefix(dev, "/dev/tpmrm") && !slices.ContainsFunc(d["SupplementaryGroups"], func(g string) bool {
			return slices.Contains(strings.Fields(g), "tss")
		}) {
			t.Errorf("DeviceAllow=%s without SupplementaryGroups=tss: with CapabilityBoundingSet= empty, root cannot open a tss:tss 0660 TPM node", dev)
		}
	}
	// A refused PIN (exit 78) must not be retried by restarts, and nothing may run
	// before the main process: systemd applies RestartPreventExitStatus= to the main
	// process only.
	if got := d["RestartPreventExitStatus"]; len(got) != 1 || !slices.Contains(strings.Fields(got[0]), "78") {
		t.Errorf("RestartPreventExitStatus=%q, want 78 (a token refused the PIN)", got)
	}
	if pre := d["ExecStartPre"]; len(pre) != 0 {
		t.Errorf("ExecStartPre=%q: a failing pre-command is restarted regardless of RestartPreventExitStatus=", pre)
	}
	for _, k := range []string{"ExecStart", "ExecStartPre"} {
		for _, cmd := range d[k] {
			checkCommandLine(t, unit+" "+k, strings.Fields(cmd))
		}
	}
}

// TestSystemdUnitVerifies runs systemd-analyze verify on the unit, with the hwkms path
// pointed at a stand-in executable (verify checks that ExecStart exists).
func TestSystemdUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("systemd-analyze is required when CI is set (install the systemd package)")
		}
		t.Skip("systemd-analyze not installed; skipping systemd-analyze verify (CI unset)")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "hwkms")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join("systemd", "hwkms.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(dir, "hwkms.service")
	if err := os.WriteFile(unit, []byte(strings.ReplaceAll(string(data), "/usr/bin/hwkms", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", unit).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
