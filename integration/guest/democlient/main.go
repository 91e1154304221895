// Command democlient is the workload client of `make demo`: it writes numbered records to the
// test guest's service over one TCP connection, each acknowledged only once it is on the guest's
// disk, until it gets SIGTERM or SIGINT; then it checks on the same connection that every
// acknowledged record is in the guest's log and on its disk, and prints what it saw.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/client"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:7777", "the guest service's address")
	interval := flag.Duration("interval", 20*time.Millisecond, "pause between records")
	wait := flag.Duration("wait", 90*time.Second, "how long to wait for the guest's service to answer at start")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	dctx, cancel := context.WithTimeout(ctx, *wait)
	c, err := client.DialReady(dctx, *addr, 250*time.Millisecond)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "democlient: the guest's service did not answer on %s: %v\n", *addr, err)
		os.Exit(1)
	}
	defer c.Close()
	fmt.Printf("democlient: connected to %s; writing a record every %v\n", *addr, *interval)
	var acked uint64
	var longest time.Duration
	var longestAt uint64
	start := time.Now()
	for n := uint64(1); ctx.Err() == nil; n++ {
		t0 := time.Now()
		wctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		err := c.Write(wctx, n, client.Payload(n))
		cancel()
		if err != nil {
			fmt.Printf("democlient: FAILED: record %d: %v (acknowledged before: %d)\n", n, err, acked)
			os.Exit(1)
		}
		acked = n
		if d := time.Since(t0); d > longest {
			longest, longestAt = d, n
		}
		select {
		case <-ctx.Done():
		case <-time.After(*interval):
		}
	}
	qctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := client.Expected(acked)
	mem, err1 := c.Query(qctx)
	disk, err2 := c.QueryDisk(qctx)
	fmt.Printf("democlient: %d records sent and acknowledged in %v on one TCP connection\n", acked, time.Since(start).Round(time.Second))
	fmt.Printf("democlient: longest wait for an acknowledgement: %v (record %d)\n", longest.Round(time.Millisecond), longestAt)
	switch {
	case err1 != nil || err2 != nil:
		fmt.Printf("democlient: FAILED: query on the same connection: %v %v\n", err1, err2)
		os.Exit(1)
	case mem != want || disk != want:
		fmt.Printf("democlient: FAILED: guest memory %+v, disk %+v, want %+v\n", mem, disk, want)
		os.Exit(1)
	}
	fmt.Printf("democlient: the guest holds all %d records in memory and on disk (checksum %016x): none lost, same connection\n", acked, uint64(want.Checksum))
}
