module github.com/lockstepvm/lockstep

go 1.26
