package checkpoint

import (
	"os"
	"testing"
	"time"
)

// processStart reads a process's start time from /proc: this test process started before now
// and not long ago, and a process that does not exist is an error.
func TestProcessStart(t *testing.T) {
	st, err := processStart(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if now := time.Now(); st.After(now.Add(time.Second)) || now.Sub(st) > 10*time.Minute {
		t.Fatalf("this process started %v, now %v", st, now)
	}
	if _, err := processStart(1 << 30); err == nil {
		t.Fatal("no error for a process that does not exist")
	}
}
