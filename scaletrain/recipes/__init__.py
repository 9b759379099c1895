"""Model families. Each sub-package registers one recipe; the core discovers them all."""
