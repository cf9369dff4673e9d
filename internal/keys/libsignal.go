package keys

import "go.mau.fi/libsignal/logger"

// libsignal logs through a package-level logger that it creates, without
// synchronisation, on first use, and whose default prints to stdout. Give
// it a silent one before any concurrent use: the server's logs must not
// hold key material, and the lazy creation is a data race.
func init() {
	if logger.Logger == nil {
		var l logger.Loggable = silent{}
		logger.Setup(&l)
	}
}

type silent struct{}

func (silent) Debug(caller, message string)   {}
func (silent) Info(caller, message string)    {}
func (silent) Warning(caller, message string) {}
func (silent) Error(caller, message string)   {}
func (silent) Configure(settings string)      {}
