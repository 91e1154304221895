module github.com/lockstepvm/lockstep

go 1.26

require (
	github.com/digitalocean/go-qemu v0.0.0-20250212194115-ee9b0668d242 // indirect
	go.uber.org/goleak v1.3.0 // indirect
)
