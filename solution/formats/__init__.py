"""File formats shared by several stages: one reader and one writer each."""
