"""Every way weights come in and go out."""
