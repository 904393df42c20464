"""Everything qcrypt knows about libvirt, in one package.

* :mod:`qcrypt.libvirt.domainxml`: the domain XML model (disks, backing stores, encryption) and its parser.
* :mod:`qcrypt.libvirt.xmledit`: the disk rewrite ``migrate-domain`` defines, and the XML diff it shows.
* :mod:`qcrypt.libvirt.xmldir`: a folder of domain XML files for ``scan --libvirt-xml``.
* :mod:`qcrypt.libvirt.connection`: a libvirt connection, through the Python binding or ``virsh``.
* :mod:`qcrypt.libvirt.usage`: which domains (and which images' backing chains) use an image file.

Fixing a whole domain is :mod:`qcrypt.domain.migrate`, a layer above; the VM-start hook (:mod:`qcrypt.hook.check`)
builds on the model here. Nothing is imported here: the hook loads only the XML model.
"""
