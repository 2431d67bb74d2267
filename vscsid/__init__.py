"""vscsid: a vhost-user SCSI device daemon."""

__version__ = "0.1.0"
