"""Everything qcrypt knows about libvirt, in one package.

* :mod:`qcrypt.libvirt.domainxml`: the domain XML model (disks, backing stores, encryption) and its parser.
* :mod:`qcrypt.libvirt.xmledit`: the disk rewrite ``migrate-domain`` defines, and the XML diff it shows.
* :mod:`qcrypt.libvirt.xmldir`: a folder of domain XML files for ``scan --libvirt-xml``.
* :mod:`qcrypt.libvirt.connection`: a libvirt connection, through the Python binding or ``virsh``.
* :mod:`qcrypt.domain.migrate`: fixing a whole domain (plan, migrate every disk, define, roll back).

The VM-start hook (:mod:`qcrypt.hook.check`) builds on the model here.
"""

from __future__ import annotations

from qcrypt.libvirt.xmldir import annotate_reports, declared_formats, read_domains

__all__ = ["annotate_reports", "declared_formats", "read_domains"]
