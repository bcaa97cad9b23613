package main

import (
	"errors"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

// TestVersionCommand: "hwkms version" prints the build's version and commit, the Go
// version and the modules of the running binary's build info; arguments are a usage
// error.
func TestVersionCommand(t *testing.T) {
	oldV, oldC := version, commit
	version, commit = "v9.8.7-test", "0123456789abcdef"
	t.Cleanup(func() { version, commit = oldV, oldC })

	out, errOut, err := runArgs(t, "version")
	if err != nil {
		t.Fatalf("version: %v (stderr %q)", err, errOut)
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		t.Fatal("test binary has no build info")
	}
	want := []string{"hwkms v9.8.7-test\n", "commit: 0123456789abcdef\n", "go: " + bi.GoVersion + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"}
	for _, d := range bi.Deps {
		want = append(want, "dep: "+d.Path+" "+d.Version+"\n")
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("version output lacks %q:\n%s", w, out)
		}
	}
	if !strings.HasPrefix(out, "hwkms v9.8.7-test\n") {
		t.Errorf("the first line must be the version: %q", out)
	}
	// The modules hwkms links (miekg/pkcs11 is always in): the SBOM lists the same.
	if !strings.Contains(out, "dep: github.com/miekg/pkcs11 ") {
		t.Errorf("version output does not list github.com/miekg/pkcs11:\n%s", out)
	}

	if _, errOut, err := runArgs(t, "version", "extra"); !errors.Is(err, exitError(2)) || !strings.Contains(errOut, "no arguments") {
		t.Errorf("version extra: err %v, stderr %q; want exit 2 and a usage message", err, errOut)
	}
}

// TestVersionText checks the formatting of versionText on build infos made by hand:
// without build info, with a replaced module and an unversioned main module.
func TestVersionText(t *testing.T) {
	tests := []struct {
		name string
		bi   *debug.BuildInfo
		want []string
		not  []string
	}{
		{
			name: "no build info",
			bi:   nil,
			want: []string{"hwkms v1\n", "commit: c1\n", "go: " + runtime.Version() + " "},
			not:  []string{"module:", "dep:"},
		},
		{
			name: "replaced dep and devel main",
			bi: &debug.BuildInfo{
				GoVersion: "go1.99.1",
				Main:      debug.Module{Path: "github.com/hwkms/hwkms"},
				Deps: []*debug.Module{
					{Path: "example.com/a", Version: "v1.2.3"},
					{Path: "example.com/b", Version: "v0.1.0", Replace: &debug.Module{Path: "../b"}},
				},
				Settings: []debug.BuildSetting{{Key: "CGO_ENABLED", Value: "1"}, {Key: "GOAMD64", Value: "v1"}},
			},
			want: []string{
				"go: go1.99.1 ", "build: CGO_ENABLED=1\n", "module: github.com/hwkms/hwkms (devel)\n",
				"dep: example.com/a v1.2.3\n", "dep: example.com/b v0.1.0 => ../b (devel)\n",
			},
			not: []string{"GOAMD64"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := versionText("v1", "c1", tt.bi)
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("lacks %q:\n%s", w, got)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(got, n) {
					t.Errorf("has %q:\n%s", n, got)
				}
			}
		})
	}
}
