#!/usr/bin/env bash
# Install what the PACS tests need from Debian, when missing and when we may use apt:
#   orthanc + orthanc-dicomweb (a real PACS the tests start on free loopback ports),
#   dcmtk (storescu, to push a study to the listener), dicom3tools (dciodvfy, to validate the SR and SC).
# Idempotent; never fails the build: without these parts the PACS tests are skipped with a reason.
set -u
need=()
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need+=(dicom3tools)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} for the PACS tests (apt-get) ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      orthanc orthanc-dicomweb dcmtk dicom3tools) >/dev/null 2>&1 \
    || echo "warning: could not install ${need[*]}; the PACS tests that need them will be skipped"
else
  echo "note: ${need[*]} missing and apt-get unavailable (or not root); the PACS tests that need them will be skipped"
fi
exit 0
