"""Built-in symphase plugins, registered exactly like third-party ones."""
