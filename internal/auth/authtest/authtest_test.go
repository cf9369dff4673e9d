package authtest

import (
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/accountstest"
)

func TestConformance(t *testing.T) {
	accountstest.Run(t, func(t *testing.T) accounts.Store { return New() })
}
