package e2e

import "go.mau.fi/libsignal/logger"

// libsignal logs through a package-level logger, created without
// synchronisation on first use, whose default prints errors to stdout:
// that would tear a terminal and break JSON output, and the lazy creation
// is a data race between the Engine's goroutines. The Engine reports every
// failure itself (DecryptError, SealError), so the library's own lines are
// dropped; a silent logger is installed before any use.
func init() {
	if logger.Logger == nil {
		var l logger.Loggable = silentLog{}
		logger.Setup(&l)
	}
}

type silentLog struct{}

func (silentLog) Debug(caller, message string)   {}
func (silentLog) Info(caller, message string)    {}
func (silentLog) Warning(caller, message string) {}
func (silentLog) Error(caller, message string)   {}
func (silentLog) Configure(settings string)      {}
