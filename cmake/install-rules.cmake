# Install rules: headers, the exported mproc::mproc target, and a relocatable package config.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MPROC_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/mproc"
    CACHE STRING "Where mprocConfig.cmake is installed")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/mproc"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        COMPONENT mproc_Development)

install(TARGETS mproc EXPORT mprocTargets)
install(EXPORT mprocTargets
        NAMESPACE mproc::
        DESTINATION "${MPROC_INSTALL_CMAKEDIR}"
        COMPONENT mproc_Development)

configure_package_config_file(
    "${PROJECT_SOURCE_DIR}/cmake/mprocConfig.cmake.in"
    "${PROJECT_BINARY_DIR}/mprocConfig.cmake"
    INSTALL_DESTINATION "${MPROC_INSTALL_CMAKEDIR}")
write_basic_package_version_file(
    "${PROJECT_BINARY_DIR}/mprocConfigVersion.cmake"
    COMPATIBILITY SameMinorVersion
    ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/mprocConfig.cmake" "${PROJECT_BINARY_DIR}/mprocConfigVersion.cmake"
        DESTINATION "${MPROC_INSTALL_CMAKEDIR}"
        COMPONENT mproc_Development)
