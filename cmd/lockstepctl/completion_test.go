package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cliOnPath puts a "lockstepctl" on PATH that is this test binary acting as the CLI (TestMain),
// and returns the environment for a shell that runs it.
func cliOnPath(t *testing.T) []string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Symlink(exe, filepath.Join(dir, "lockstepctl")); err != nil {
		t.Fatal(err)
	}
	return append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"), "LOCKSTEPCTL_TEST_AS_CLI=1", "LOCKSTEP_ADDR=unix:///nonexistent/api.sock", "COLUMNS=200")
}

func script(t *testing.T, shell string) string {
	t.Helper()
	code, out, errOut := runCtl("completion", shell)
	if code != exitOK || !strings.Contains(out, "__complete") {
		t.Fatalf("completion %s: exit %d\n%s", shell, code, errOut)
	}
	f := filepath.Join(t.TempDir(), "lockstepctl."+shell)
	os.WriteFile(f, []byte(out), 0o600)
	return f
}

// The scripts of the three shells are generated; zsh and fish check their syntax.
func TestCompletionScripts(t *testing.T) {
	for _, tc := range []struct{ shell, want string }{
		{"bash", "complete -o default -F __start_lockstepctl lockstepctl"},
		{"zsh", "#compdef lockstepctl"},
		{"fish", "complete -c lockstepctl"},
	} {
		f := script(t, tc.shell)
		b, _ := os.ReadFile(f)
		if !strings.Contains(string(b), tc.want) {
			t.Errorf("%s script lacks %q", tc.shell, tc.want)
		}
		check := map[string][]string{"bash": {"bash", "-n", f}, "zsh": {"zsh", "-n", f}, "fish": {"fish", "--no-execute", f}}[tc.shell]
		if _, err := exec.LookPath(check[0]); err != nil {
			t.Errorf("%s is not installed (.ci/run installs it): %v", check[0], err)
			continue
		}
		if out, err := exec.Command(check[0], check[1:]...).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", strings.Join(check, " "), err, out)
		}
	}
	if code, _, errOut := runCtl("completion", "tcsh"); code != exitUsage || !strings.Contains(errOut, "bash, zsh and fish") {
		t.Errorf("completion tcsh: exit %d: %s", code, errOut)
	}
}

// In bash, with the bash-completion package as a user has it: commands, flag values, files and
// pair names (asked from the agent of --addr, wherever --addr is), as bash splits the words.
func TestBashCompletion(t *testing.T) {
	const bashCompletion = "/usr/share/bash-completion/bash_completion"
	if _, err := os.Stat(bashCompletion); err != nil {
		t.Fatalf("Debian's bash-completion package is not installed (.ci/run installs it): %v", err)
	}
	_, addr := serveFake(t, protectedPair("db1"), protectedPair("db2"), protectedPair("web"))
	env := cliOnPath(t)
	f := script(t, "bash")
	work := t.TempDir()
	os.WriteFile(filepath.Join(work, "db1.yaml"), nil, 0o600)
	os.WriteFile(filepath.Join(work, "notes.txt"), nil, 0o600)
	// bash splits "unix:///x" at the colon (COMP_WORDBREAKS); the words are given as bash gives them.
	sock := strings.TrimPrefix(addr, "unix:")
	complete := func(words ...string) []string {
		t.Helper()
		line := strings.Join(words, " ")
		// compgen -F runs the completion function as bash's completion would, and prints its
		// COMPREPLY; the function is wrapped to give it the words.
		prog := `source ` + bashCompletion + `
source ` + f + `
complete -p lockstepctl >/dev/null || exit 3
words() {
  COMP_WORDS=(` + quoteWords(words) + `)
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMP_LINE=` + shq(strings.ReplaceAll(line, " : ", ":")) + `
  COMP_POINT=${#COMP_LINE}
  __start_lockstepctl "$@"
}
compgen -F words -- ` + shq(words[len(words)-1]) + `
`
		cmd := exec.Command("bash", "--norc", "--noprofile", "-c", prog)
		cmd.Env, cmd.Dir = env, work
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil && !(errors.As(err, new(*exec.ExitError)) && len(out) == 0) {
			t.Fatalf("bash: %v\n%s%s", err, out, stderr.String())
		}
		var got []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				got = append(got, strings.Fields(l)[0])
			}
		}
		return got
	}
	for _, tc := range []struct {
		name  string
		words []string
		want  []string
	}{
		{"command", []string{"lockstepctl", "sta"}, []string{"start", "status"}},
		{"commands", []string{"lockstepctl", "re"}, []string{"reprotect"}},
		{"pair names after --addr", []string{"lockstepctl", "--addr", "unix", ":", sock, "status", ""}, []string{"db1", "db2", "web"}},
		{"pair names by prefix", []string{"lockstepctl", "--addr", "unix", ":", sock, "failover", "d"}, []string{"db1", "db2"}},
		{"--addr after the command", []string{"lockstepctl", "watch", "--addr", "unix", ":", sock, "w"}, []string{"web"}},
		{"one name only", []string{"lockstepctl", "--addr", "unix", ":", sock, "delete", "db1", ""}, nil},
		{"no agent, no names", []string{"lockstepctl", "--addr", "unix", ":", "///nonexistent/x.sock", "status", ""}, nil},
		{"output formats", []string{"lockstepctl", "status", "-o", ""}, []string{"table", "json", "yaml"}},
		{"spec files", []string{"lockstepctl", "create", "-f", ""}, []string{"db1.yaml"}},
		{"flags of create", []string{"lockstepctl", "create", "--w"}, []string{"--wait"}},
		{"flags of failover", []string{"lockstepctl", "failover", "--f"}, []string{"--forced"}},
		{"status has no --forced", []string{"lockstepctl", "status", "--fo"}, nil},
		{"shells", []string{"lockstepctl", "completion", ""}, []string{"bash", "zsh", "fish"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := complete(tc.words...)
			if strings.Join(got, " ") != strings.Join(tc.want, " ") {
				t.Errorf("%q completes to %q, want %q", strings.Join(tc.words, " "), got, tc.want)
			}
		})
	}
}

// fish runs its completions for a command line with complete -C.
func TestFishCompletion(t *testing.T) {
	if _, err := exec.LookPath("fish"); err != nil {
		t.Fatalf("fish is not installed (.ci/run installs it): %v", err)
	}
	_, addr := serveFake(t, protectedPair("db1"), protectedPair("web"))
	f := script(t, "fish")
	cmd := exec.Command("fish", "--no-config", "-c", "source "+f+"; complete -C 'lockstepctl --addr "+addr+" status '")
	cmd.Env = append(cliOnPath(t), "HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("fish: %v\n%s", err, out)
	}
	if got := string(out); !strings.Contains(got, "db1\tprotected") || !strings.Contains(got, "web\tprotected") {
		t.Fatalf("fish completes %q", got)
	}
}

// zsh and fish call the hidden __complete path, which must answer after --addr X.
func TestCompletePath(t *testing.T) {
	_, addr := serveFake(t, protectedPair("db1"), protectedPair("web"))
	for _, args := range [][]string{{"__complete", "--addr", addr, "status", ""}, {"__complete", "status", "--addr", addr, ""}, {"__completeNoDesc", "--addr", addr, "get", "w"}} {
		code, out, errOut := runCtl(args...)
		if code != exitOK {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if lines[len(lines)-1] != ":4" { // cobra.ShellCompDirectiveNoFileComp
			t.Errorf("%v: directive %q", args, lines[len(lines)-1])
		}
		if !strings.Contains(out, "web") || (args[0] == "__complete") != strings.Contains(out, "db1\tprotected") {
			t.Errorf("%v: %q", args, out)
		}
	}
}

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func quoteWords(ws []string) string {
	q := make([]string, len(ws))
	for i, w := range ws {
		q[i] = shq(w)
	}
	return strings.Join(q, " ")
}

// An interactive bash in tmux, completing with the Tab key as a user does: readline runs the
// completion function, compopt included.
func TestBashCompletionInteractive(t *testing.T) {
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Fatalf("tmux is not installed (.ci/run installs it): %v", err)
	}
	_, addr := serveFake(t, protectedPair("db1"), protectedPair("web"))
	f := script(t, "bash")
	sockDir := t.TempDir()
	tm := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("tmux", append([]string{"-S", filepath.Join(sockDir, "tmux.sock"), "-f", "/dev/null"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	env := cliOnPath(t)
	envArgs := []string{"env", "-i"}
	for _, e := range env {
		if strings.HasPrefix(e, "PATH=") || strings.HasPrefix(e, "LOCKSTEP") || strings.HasPrefix(e, "HOME=") {
			envArgs = append(envArgs, e)
		}
	}
	tm(append([]string{"new-session", "-d", "-x", "200", "-y", "40"}, append(envArgs, "TERM=xterm", "bash", "--norc", "--noprofile")...)...)
	pid := strings.TrimSpace(tm("display-message", "-p", "#{pid}"))
	t.Cleanup(func() {
		// The tmux server, by its PID (it ends its shell with it).
		if n, err := strconv.Atoi(pid); err == nil {
			if p, err := os.FindProcess(n); err == nil {
				p.Kill()
				p.Wait()
			}
		}
	})
	tm("send-keys", "PS1='$ '; source /usr/share/bash-completion/bash_completion; source "+f+"; clear", "Enter")
	waitPane := func(want ...string) string {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			pane := tm("capture-pane", "-p")
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(pane, w)
			}
			if ok {
				return pane
			}
			if time.Now().After(deadline) {
				t.Fatalf("the terminal does not show %q:\n%s", want, pane)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	tm("send-keys", "lockstepctl --addr "+addr+" fail", "Tab")
	waitPane("$ lockstepctl --addr " + addr + " failover") // capture-pane drops trailing blanks
	tm("send-keys", "Tab", "Tab")
	waitPane("db1", "web", "(protected)")
	tm("send-keys", "w", "Tab", "X")
	waitPane("failover web X") // the name completed, and a blank after it
}
