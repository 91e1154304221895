// Command workload is the service that runs inside the lockstep test guest.
//
// It keeps an append-only log of numbered records in memory and on the raw
// block device /dev/sda (no file system), syncing every record to the disk
// before acknowledging it, and serves it over TCP port 7777 with the line
// protocol documented in package wire:
//
//	W <n> <payload>\n  -> A <n>\n | E <reason>\n   append record n (n = last+1)
//	Q\n                -> S <count> <last> <checksum>\n   summary of the memory log
//	D\n                -> S <count> <last> <checksum>\n   summary re-read from the disk
//	P\n                -> P\n                            ping
//
// On start it recovers the log from the disk, so a restarted service goes on
// where the previous one stopped. Without the device it says so on the console
// and runs memory-only. Lines starting with "lockstep-guest:" on its standard
// output are markers that tests and people look for on the serial console.
//
// It is built with CGO_ENABLED=0 so that it runs in the guest's initramfs,
// which has no C library.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os/signal"
	"syscall"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/logsvc"
	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

func main() {
	listen := flag.String("listen", fmt.Sprintf(":%d", wire.DefaultPort), "TCP address to serve on")
	disk := flag.String("disk", "/dev/sda", "block device (or file) holding the log; empty: memory-only")
	diskWait := flag.Duration("disk-wait", 10*time.Second, "how long to wait for the disk to appear")
	flag.Parse()
	log.SetPrefix("lockstep-guest: workload: ")
	log.SetFlags(0)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, *listen, *disk, *diskWait); err != nil {
		log.Fatal(err)
	}
}

func marker(format string, args ...any) {
	fmt.Printf("lockstep-guest: "+format+"\n", args...)
}

func run(ctx context.Context, listen, disk string, diskWait time.Duration) error {
	var dev logsvc.Device
	if disk != "" {
		d, err := openDisk(ctx, disk, diskWait)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			marker("no disk at %s, running memory-only: acknowledged records are NOT durable", disk)
		case err != nil:
			return fmt.Errorf("open disk %s: %w", disk, err)
		default:
			defer d.Close()
			dev = d
		}
	}
	l, err := logsvc.Open(dev)
	if err != nil {
		return err
	}
	if d, ok := dev.(*logsvc.FileDevice); ok {
		reads := "through the page cache"
		if d.Direct() {
			reads = "direct"
		}
		s := l.Summary()
		marker("disk %s: %d slots, reads %s, recovered %d records, last %d", disk, l.Capacity(), reads, s.Count, s.Last)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	marker("workload listening on %s", listen)
	srv := &logsvc.Server{Log: l, Logf: log.Printf}
	return srv.Serve(ctx, ln)
}

// openDisk opens the device, waiting up to wait for it to appear: the SCSI
// disk shows up in devtmpfs only once the ATA probe has finished, which may
// be after the init script started us.
func openDisk(ctx context.Context, path string, wait time.Duration) (*logsvc.FileDevice, error) {
	deadline := time.Now().Add(wait)
	for {
		d, err := logsvc.OpenDevice(path)
		if err == nil || !errors.Is(err, fs.ErrNotExist) || time.Now().After(deadline) {
			return d, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
