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

# mproc.pc, for pkg-config, in the folder pkg-config searches for architecture-independent files.
# Its prefix is the one mproc is installed to, which `cmake --install <build> --prefix <dir>` may
# change after configuring: the file is made from cmake/mproc.pc.in in two steps — now, everything
# but the prefix (left as @CMAKE_INSTALL_PREFIX@), and at install time, the prefix.
set(MPROC_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_DATADIR}/pkgconfig"
    CACHE STRING "Where mproc.pc is installed")
set(MPROC_PC_PREFIX "@CMAKE_INSTALL_PREFIX@")
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
    set(MPROC_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
    set(MPROC_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file("${PROJECT_SOURCE_DIR}/cmake/mproc.pc.in" "${PROJECT_BINARY_DIR}/mproc.pc.in" @ONLY)
if(IS_ABSOLUTE "${MPROC_INSTALL_PKGCONFIGDIR}")
    set(_mproc_pc_destination "${MPROC_INSTALL_PKGCONFIGDIR}")
else()
    set(_mproc_pc_destination "\${CMAKE_INSTALL_PREFIX}/${MPROC_INSTALL_PKGCONFIGDIR}")
endif()
install(CODE "
    get_filename_component(CMAKE_INSTALL_PREFIX \"\${CMAKE_INSTALL_PREFIX}\" ABSOLUTE)
    configure_file(\"${PROJECT_BINARY_DIR}/mproc.pc.in\" \"${PROJECT_BINARY_DIR}/mproc.pc\" @ONLY)
    file(INSTALL DESTINATION \"${_mproc_pc_destination}\" TYPE FILE FILES \"${PROJECT_BINARY_DIR}/mproc.pc\")"
    COMPONENT mproc_Development)
unset(_mproc_pc_destination)
